"""Run facts shown where people look: Prefect artifacts for the UI, and text for the terminal."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fulcrum.settings import Settings

if TYPE_CHECKING:
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
        f"- Conversion model version: {result.conversion_model_version or 'none'}",
        f"- Value model version: {result.value_model_version or 'none'}",
        f"- Validation: {_validation_line(validation)}",
        f"- Overlay weight: {settings.overlay_weight} (0 = sales volume, 1 = account value)",
        "",
    ]
    rows = headline_metrics(result.metrics)
    if rows:
        lines += ["## Holdout metrics of the models trained tonight", "", "| model | metric | value |", "|---|---|---|"]
        lines += [f"| {model} | {name} | {value:.4f} |" for model, name, value in rows]
        lines.append("")
    for kind, registration in result.registrations.items():
        if registration.run_id:
            lines.append(
                f"- MLflow run of the {kind} model: `{registration.run_id}` in experiment "
                f"`{settings.experiment_name}`, version {registration.new_version} of "
                f"`{registration.model_name}` ({registration.reason})"
            )
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _validation_line(summary: dict) -> str:
    if not summary:
        return "not run"
    evaluated = summary.get("evaluated", "?")
    failed = summary.get("failed", "?")
    status = "passed" if summary.get("success") else "failed"
    return f"{status} ({evaluated} expectations evaluated, {failed} failed)"


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
