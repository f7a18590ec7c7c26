"""Backfill Fulcrum on the Olist data month by month and print the tables of docs/datasets/olist.md.

Usage: python bench/olist_report.py --data ../shared/data --workdir var/olist-report
       [--plot docs/datasets/olist_frontier.png] [--skip-backfill]

The script loads the Olist files into ``WORKDIR/olist.db`` with the default assumptions,
writes ``WORKDIR/fulcrum.toml``, and runs the backfill-scores flow monthly from 2017-12-01
to 2018-09-01 with retraining (or loops over the nightly flow when flows/backfill.py is
absent). Then it reads what the runs published and, for every date, rebuilds the
conversion training set and refits the model with the same seed. The refit must reproduce
the logged ROC AUC, which shows that the baseline (the conversion rate of each origin in
the fitting rows) is scored on the same holdout rows. The report goes to standard output
as Markdown; the frontier plot of the last date goes to ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sklearn.metrics import roc_auc_score

logger = logging.getLogger("olist_report")

FIRST_AS_OF = dt.date(2017, 12, 1)
LAST_AS_OF = dt.date(2018, 9, 1)
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder that contains the Olist folders")
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder for the warehouse and MLflow")
    parser.add_argument("--plot", type=Path, help="where to write the frontier PNG of the last date")
    parser.add_argument(
        "--skip-backfill", action="store_true", help="report on the runs already in WORKDIR"
    )
    return parser.parse_args(argv)


def monthly_dates() -> list[dt.date]:
    dates, day = [], FIRST_AS_OF
    while day <= LAST_AS_OF:
        dates.append(day)
        day = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return dates


def prepare_workdir(data_dir: Path, workdir: Path) -> None:
    """Load the Olist files and point every Fulcrum setting at ``workdir``."""
    from fulcrum.datasets.olist import load_olist

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    os.environ["FULCRUM_CONFIG"] = str(workdir / "fulcrum.toml")
    os.environ["FULCRUM_MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["FULCRUM_MLFLOW_ARTIFACT_LOCATION"] = str(workdir / "mlartifacts")
    os.environ["FULCRUM_VAR_DIR"] = str(workdir / "var")
    result = load_olist(data_dir, f"sqlite:///{workdir / 'olist.db'}")
    (workdir / "fulcrum.toml").write_text(result.config.render(), encoding="utf-8")
    logger.info("%s", result.describe())


def run_backfill(dates: list[dt.date]) -> None:
    """Score every date with retraining, oldest first. Failed dates are recorded, not raised."""
    try:
        from flows.backfill import BackfillError, backfill_scores
    except ImportError:
        backfill_scores = None

    if backfill_scores is not None:
        try:
            backfill_scores(start=dates[0], end=dates[-1], every="month", retrain=True, force=True)
        except BackfillError as exc:
            logger.info("backfill finished with failed dates: %s", exc)
        return

    from flows.nightly import StageError, nightly_scores

    for as_of in dates:
        try:
            nightly_scores(as_of=as_of)
        except StageError as exc:
            logger.info("run as of %s failed: %s", as_of, exc)


def read_runs(engine: sa.Engine) -> pd.DataFrame:
    """Return the newest run per as-of date from score_runs."""
    with engine.connect() as connection:
        runs = pd.read_sql_query(sa.text("SELECT * FROM score_runs ORDER BY started_at"), connection)
    runs["as_of"] = pd.to_datetime(runs["as_of"]).dt.date
    return runs.groupby("as_of").tail(1).set_index("as_of").sort_index()


def runs_table(runs: pd.DataFrame, workdir: Path) -> str:
    rows = ["| as of | status | stage that failed | validation | leads scored | accounts labelled | conversion / value version | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for as_of, run in runs.iterrows():
        validation = _json(run["validation_summary"])
        checked = (
            f"{'passed' if validation.get('success') else 'failed'}, "
            f"{validation.get('failed', 0)} of {validation.get('evaluated', 0)} failed"
            if validation else "not run"
        )
        notes = _json(run["metrics"]).get("notes", [])
        detail = "; ".join(notes) if run["status"] == "succeeded" else _text(run["message"])
        rows.append(
            f"| {as_of} | {run['status']} | {_text(run['failed_stage'])} | {checked} | "
            f"{_count(run['leads_scored'])} | {_count(run['accounts_labelled'])} | "
            f"{_text(run['conversion_model_version'])} / {_text(run['value_model_version'])} | "
            f"{_cell(detail.replace(str(workdir), 'WORKDIR'))} |"
        )
    return "\n".join(rows)


def conversion_table(dates: list[dt.date], runs: pd.DataFrame) -> str:
    """Refit the conversion model of each date and score the origin baseline on its holdout."""
    rows = ["| as of | training rows (positives) | holdout rows (positives) | ROC AUC logged | ROC AUC refit | baseline ROC AUC | PR AUC | Brier | lift top decile |",
            "|---|---|---|---|---|---|---|---|---|"]
    for as_of in dates:
        logged = _logged_metrics(runs, as_of).get("conversion", {})
        rows.append(conversion_row(as_of, logged))
    return "\n".join(rows)


def conversion_row(as_of: dt.date, logged: dict) -> str:
    from flows.nightly import feature_spec
    from fulcrum.settings import load_settings
    from tasks.extract import as_of_cutoff, extract_sources
    from tasks.features import build_conversion_training_set
    from tasks.train import InsufficientDataError, split_by_time, train_conversion_model

    settings = load_settings()
    cutoff = as_of_cutoff(as_of, settings.business_timezone)
    frames = extract_sources(settings, as_of)
    # Without a deal won before the cutoff there is no positive to learn from.
    if not frames.opportunities["won"].fillna(False).astype(bool).any():
        return f"| {as_of} | - | no deal won before the cutoff | - | - | - | - | - | - |"
    training = build_conversion_training_set(frames, cutoff, settings)
    frame = training.frame
    positives = int(frame["label"].sum()) if len(frame) else 0
    try:
        trained = train_conversion_model(frame, feature_spec(training), settings)
    except InsufficientDataError as exc:
        return f"| {as_of} | {len(frame):,} ({positives}) | no model: {_cell(str(exc))} | - | - | - | - | - | - |"

    fit_positions, holdout_positions = split_by_time(frame, settings.model.holdout_fraction)
    baseline = origin_baseline(frame.iloc[fit_positions], frame.iloc[holdout_positions])
    holdout = trained.holdout_predictions
    metrics = trained.metrics
    return (
        f"| {as_of} | {len(frame):,} ({positives}) | {len(holdout):,} ({int(holdout['actual'].sum())}) | "
        f"{_number(logged.get('roc_auc'))} | {metrics['roc_auc']:.3f} | {baseline:.3f} | "
        f"{metrics['pr_auc']:.3f} | {metrics['brier']:.4f} | {metrics['lift_top_decile']:.2f} |"
    )


def origin_baseline(fit: pd.DataFrame, holdout: pd.DataFrame) -> float:
    """ROC AUC on the holdout of the fitting rows' conversion rate per origin (channel).

    A missing origin is its own group, and an origin the fitting rows lack gets their
    overall rate.
    """
    fit_origin = fit["channel"].astype(object).where(fit["channel"].notna(), "__missing__")
    holdout_origin = holdout["channel"].astype(object).where(holdout["channel"].notna(), "__missing__")
    rates = fit["label"].groupby(fit_origin.to_numpy()).mean()
    scores = holdout_origin.map(rates).fillna(fit["label"].mean()).to_numpy(dtype=float)
    return float(roc_auc_score(holdout["label"].to_numpy(), scores))


def value_table(dates: list[dt.date], runs: pd.DataFrame) -> str:
    rows = ["| as of | Spearman | MAE of log1p(LTV) | mean predicted / mean actual | holdout mean LTV (BRL) |",
            "|---|---|---|---|---|"]
    for as_of in dates:
        metrics = _logged_metrics(runs, as_of).get("value")
        notes = [note for note in _notes(runs, as_of) if note.startswith("value model")]
        if not metrics:
            rows.append(f"| {as_of} | - | - | - | {_cell('; '.join(notes)) or 'no run reached training'} |")
            continue
        rows.append(
            f"| {as_of} | {metrics['spearman']:.3f} | {metrics['mae_log_ltv']:.3f} | "
            f"{metrics['mean_ratio']:.3f} | {metrics['holdout_mean_ltv']:,.0f} |"
        )
    return "\n".join(rows)


def labels_table(engine: sa.Engine, as_of: dt.date) -> str:
    """Summarise account_ltv of one date: all accounts and the five largest segments.

    Churn events are counted from the coverage spells, with the run's grace period.
    """
    from fulcrum.settings import load_settings
    from tasks.extract import as_of_cutoff, extract_sources
    from tasks.labels import coverage_spells

    with engine.connect() as connection:
        labels = pd.read_sql_query(
            sa.text("SELECT * FROM account_ltv WHERE as_of = :as_of"), connection,
            params={"as_of": as_of.isoformat()},
        )
    if labels.empty:
        return f"No account_ltv rows as of {as_of}."
    settings = load_settings()
    cutoff = as_of_cutoff(as_of, settings.business_timezone)
    spells = coverage_spells(extract_sources(settings, as_of).invoices, cutoff, settings.ltv.churn_grace_days)
    events = spells.groupby("account_id")["churned"].sum()
    labels["churn_events"] = labels["account_id"].map(events).fillna(0).astype(int)

    largest = labels["segment"].value_counts().head(5).index
    rows = ["| segment | accounts | with sales | with an LTV | active | churn events | months billed | churn rate / month | median ARPU (BRL) | median LTV (BRL) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rows.append(_labels_row("all", labels))
    rows += [_labels_row(segment, labels.loc[labels["segment"] == segment]) for segment in largest]
    return "\n".join(rows)


def _labels_row(name: str, labels: pd.DataFrame) -> str:
    # A segment shows its smoothed rate, and "all" shows the pooled raw rate of every account.
    months = labels["months_billed"].sum()
    events = int(labels["churn_events"].sum())
    rate = events / months if name == "all" else labels["churn_rate"].iloc[0]
    return (
        f"| {name} | {len(labels)} | {int((labels['months_billed'] > 0).sum())} | "
        f"{int(labels['ltv'].notna().sum())} | {int(labels['is_active'].astype(bool).sum())} | "
        f"{events} | {months:,.1f} | {rate:.3f} | {labels['arpu'].median():,.1f} | "
        f"{labels['ltv'].median():,.0f} |"
    )


def frontier_table(engine: sa.Engine, as_of: dt.date, plot: Path | None) -> str:
    from tasks.score import plot_frontier

    with engine.connect() as connection:
        frontier = pd.read_sql_query(
            sa.text("SELECT * FROM volume_value_frontier WHERE as_of = :as_of ORDER BY overlay_weight"),
            connection, params={"as_of": as_of.isoformat()},
        )
    if frontier.empty:
        return f"No frontier as of {as_of}."
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_bytes(plot_frontier(frontier))
    rows = ["| overlay weight w | expected conversions | expected value (BRL) |", "|---|---|---|"]
    rows += [
        f"| {row.overlay_weight:.1f} | {row.expected_conversions:.2f} | {row.expected_value:,.0f} |"
        for row in frontier.itertuples()
    ]
    return "\n".join(rows)


def freshness_outcome(as_of: dt.date) -> str:
    """Validate one date with the default freshness_days = 7 and return its critical failures."""
    from fulcrum.settings import load_settings
    from tasks.extract import as_of_cutoff, extract_sources
    from tasks.validate import validate_sources

    settings = load_settings(freshness_days=7)
    cutoff = as_of_cutoff(as_of, settings.business_timezone)
    report = validate_sources(
        extract_sources(settings, as_of), as_of, cutoff, settings, settings.var_dir / "freshness-check"
    )
    failures = [result.describe() for result in report.failures("critical")]
    return f"As of {as_of} with freshness_days = 7: " + ("; ".join(failures) or "passed")


def _json(text) -> dict:
    """Parse a JSON column value. NULL, which pandas reads as None or NaN, gives an empty dict."""
    return json.loads(text) if isinstance(text, str) and text else {}


def _logged_metrics(runs: pd.DataFrame, as_of: dt.date) -> dict:
    return _json(runs.loc[as_of, "metrics"]).get("metrics", {}) if as_of in runs.index else {}


def _notes(runs: pd.DataFrame, as_of: dt.date) -> list[str]:
    return _json(runs.loc[as_of, "metrics"]).get("notes", []) if as_of in runs.index else []


def _text(value) -> str:
    """Return a text column value, with NULL (None or NaN once read by pandas) as '-'."""
    return "-" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _count(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{int(value):,}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell(text: str, limit: int = 400) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plot = args.plot.resolve() if args.plot else None
    workdir = args.workdir.resolve()
    dates = monthly_dates()

    if args.skip_backfill:
        os.chdir(workdir)
        os.environ["FULCRUM_CONFIG"] = str(workdir / "fulcrum.toml")
        os.environ["FULCRUM_MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.environ["FULCRUM_VAR_DIR"] = str(workdir / "var")
    else:
        prepare_workdir(args.data.resolve(), workdir)
        run_backfill(dates)

    engine = sa.create_engine(f"sqlite:///{workdir / 'olist.db'}")
    runs = read_runs(engine)
    sections = [
        ("Runs", runs_table(runs, workdir)),
        ("Freshness with the default setting", freshness_outcome(dt.date(2018, 7, 1))),
        ("Conversion model on its time-based holdout", conversion_table(dates, runs)),
        ("Value model on its time-based holdout", value_table(dates, runs)),
        (f"LTV labels as of {LAST_AS_OF}", labels_table(engine, LAST_AS_OF)),
        (f"Frontier as of {LAST_AS_OF}", frontier_table(engine, LAST_AS_OF, plot)),
    ]
    engine.dispose()
    for title, body in sections:
        print(f"\n### {title}\n\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
