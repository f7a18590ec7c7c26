"""Run facts shown where people look: Prefect artifacts for the UI, and text for the terminal."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fulcrum.settings import Settings

if TYPE_CHECKING:
    from flows.backfill import BackfillReport
    from flows.nightly import NightlyResult

logger = logging.getLogger(__name__)

HEADLINE_METRICS = {
    "conversion": ("roc_auc", "pr_auc", "brier", "lift_top_decile"),
    "value": ("spearman", "mae_log_ltv"),
}


def headline_metrics(metrics: dict) -> list[tuple[str, str, float]]:
    """Return (model, metric, value) rows for the metrics people look at first."""
    rows = []
    for model, names in HEADLINE_METRICS.items():
        model_metrics = metrics.get(model) or {}
        for name in names:
            if name in model_metrics and model_metrics[name] is not None:
                rows.append((model, name, float(model_metrics[name])))
    return rows


def render_summary_markdown(result: "NightlyResult", settings: Settings) -> str:
    """Render the run summary as markdown for the Prefect UI."""
    validation = result.validation_summary or {}
    lines = [
        f"# Fulcrum scores as of {result.as_of}",
        "",
        f"- Run id: `{result.run_id}`",
        f"- Status: **{result.status}**",
        f"- Open leads scored: {result.leads_scored:,}",
        f"- Accounts labelled with LTV: {result.accounts_labelled:,}",
        f"- Prefect flow run: `{result.flow_run_id or 'none'}`",
        f"- Conversion model version: {_version_line(result, 'conversion')}",
        f"- Value model version: {_version_line(result, 'value')}",
        f"- Validation: {_validation_line(validation)}",
        f"- Overlay weight: {settings.overlay_weight} (0 = sales volume, 1 = account value)",
    ]
    if result.rows_published:
        written = ", ".join(f"{name} {count:,}" for name, count in result.rows_published.items())
        lines.append(f"- Rows written: {written}")
    lines.append("")

    rows = headline_metrics(result.metrics)
    if rows:
        lines += ["## Holdout metrics of the models trained tonight", "", "| model | metric | value |", "|---|---|---|"]
        lines += [f"| {model} | {name} | {value:.4f} |" for model, name, value in rows]
        lines.append("")
    lines += _mlflow_lines(result, settings)

    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _mlflow_lines(result: "NightlyResult", settings: Settings) -> list[str]:
    lines = []
    for kind, registration in result.registrations.items():
        if registration.run_id:
            lines.append(
                f"- MLflow run of the {kind} model: `{registration.run_id}` in experiment "
                f"`{settings.experiment_name}`, version {registration.new_version} of "
                f"`{registration.model_name}` ({registration.reason})"
            )
    trained_run_ids = {registration.run_id for registration in result.registrations.values()}
    for kind, run_id in result.scoring_run_ids.items():
        if run_id not in trained_run_ids:
            lines.append(f"- MLflow run that logged the {kind} model used for scoring: `{run_id}`")
    return lines


def _version_line(result: "NightlyResult", kind: str) -> str:
    version = getattr(result, f"{kind}_model_version")
    text = version or "none"
    previous = result.previous_model_versions
    if previous is None:
        return f"{text} (no earlier succeeded run to compare with)"
    since = f"the last succeeded run before this date, as of {previous['as_of']}"
    if previous.get(kind) == version:
        return f"{text} (unchanged since {since})"
    return f"{text} (changed from {previous.get(kind) or 'none'} in {since})"


def _validation_line(summary: dict) -> str:
    if not summary:
        return "not run"
    evaluated = summary.get("evaluated", "?")
    failed = summary.get("failed", "?")
    status = "passed" if summary.get("success") else "failed"
    return f"{status} ({evaluated} expectations evaluated, {failed} failed)"


def render_backfill_markdown(report: "BackfillReport") -> str:
    """Render the backfill's outcome per date as markdown for the Prefect UI."""
    dates = [outcome.as_of for outcome in report.outcomes]
    lines = [
        f"# Fulcrum backfill from {min(dates)} to {max(dates)}, every {report.every}",
        "",
        f"- retrain: {str(report.retrain).lower()}, force: {str(report.force).lower()}",
        f"- {len(report.with_status('succeeded'))} succeeded, "
        f"{len(report.with_status('skipped'))} skipped, {len(report.failed)} failed",
        "",
        "| as of | status | run id | detail |",
        "|---|---|---|---|",
    ]
    for outcome in report.outcomes:
        detail = outcome.detail.replace("|", "\\|").replace("\n", " ")
        run_id = outcome.run_id or "-"
        lines.append(f"| {outcome.as_of} | {outcome.status} | `{run_id}` | {detail} |")
    return "\n".join(lines) + "\n"


def publish_run_artifacts(result: "NightlyResult", settings: Settings) -> None:
    """Create the markdown summary and the frontier table artifacts of a run."""
    key_date = result.as_of.isoformat()
    create_markdown_artifact(
        key="fulcrum-run-summary",
        markdown=render_summary_markdown(result, settings),
        description=f"Fulcrum run summary as of {key_date}",
    )
    if result.frontier is not None and not result.frontier.empty:
        table = result.frontier.round(4).to_dict("records")
        create_table_artifact(
            key="volume-value-frontier",
            table=table,
            description=(
                f"Expected conversions and value if reps work the top {settings.rep_capacity} "
                f"leads, for each overlay weight, as of {key_date}"
            ),
        )
