"""The nightly-scores flow: extract, validate, label, train, score and publish for one date."""

from __future__ import annotations

import datetime as dt
import logging
import resource
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run
from sqlalchemy.exc import SQLAlchemyError

from fulcrum.timing import measured
from fulcrum.lock import RunLock, RunLockTimeout
from fulcrum.settings import Settings, load_settings, redact_url
from fulcrum.tracking import check_tracking_store
from fulcrum.warehouse import Warehouse
from flows.reporting import publish_run_artifacts
from tasks.extract import SourceFrames, as_of_cutoff, extract_sources_task
from tasks.features import (
    FeatureSet,
    WarehouseActivity,
    build_training_sets_task,
    event_types_from_columns,
    iter_scoring_features,
)
from tasks.labels import ACCOUNT_LTV_COLUMNS, label_accounts_in_warehouse_task
from tasks.publish import (
    previous_successful_run,
    publish_scores_task,
    record_run_end,
    record_run_start,
)
from tasks.score import (
    FRONTIER_COLUMNS,
    SCORE_COLUMNS,
    compute_frontier_task,
    score_feature_chunks_on_dask,
    score_leads_task,
)
from tasks.train import (
    ChampionModel,
    FeatureSpec,
    ModelKind,
    champion_version_as_of,
    load_champion,
    load_model_version,
    train_conversion_task,
    train_value_task,
)
from tasks.validate import validate_sources_task

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage of the nightly flow failed; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        super().__init__(f"stage '{stage}' failed: {cause}")


@dataclass
class NightlyResult:
    """Outcome of one nightly run, for the CLI, the backfill flow and tests."""

    run_id: str
    as_of: dt.date
    status: str
    leads_scored: int = 0
    accounts_labelled: int = 0
    conversion_model_version: str | None = None
    value_model_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    frontier: pd.DataFrame | None = None
    validation_summary: dict[str, Any] = field(default_factory=dict)
    registrations: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    scoring_run_ids: dict[str, str] = field(default_factory=dict)
    previous_model_versions: dict[str, str | None] | None = None
    rows_published: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_rows: dict[str, int] = field(default_factory=dict)
    stage_peak_mib: dict[str, float] = field(default_factory=dict)


class StageClock:
    """Wall time of each stage of a run, measured from one stage's start to the next one's.

    With ``peaks``, it also records the process's peak resident memory in MiB at the end of
    each stage, which shows the stage that raised the peak.
    """

    def __init__(self, seconds: dict[str, float], peaks: dict[str, float] | None = None):
        self.seconds = seconds
        self.peaks = peaks
        self.current: str | None = None
        self.started = 0.0

    def start(self, stage: str) -> str:
        """End the running stage, start timing ``stage`` and return its name."""
        self.stop()
        self.current = stage
        self.started = time.perf_counter()
        return stage

    def stop(self) -> None:
        """End the running stage, if any, and add its time to ``seconds``."""
        if self.current is not None:
            elapsed = time.perf_counter() - self.started
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + elapsed
            if self.peaks is not None:
                self.peaks[self.current] = peak_resident_mib()
            self.current = None


def peak_resident_mib() -> float:
    """Return the peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB and macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def feature_spec(features: FeatureSet) -> FeatureSpec:
    """Return the model input columns of a feature set. Training leaves out the empty ones."""
    return FeatureSpec(numeric=list(features.numeric), categorical=list(features.categorical))


def resolve_as_of(as_of: dt.date | str | None, settings: Settings) -> dt.date:
    """Return the run's data date: the given date, else the scheduled start in the business zone.

    A run started by hand has its start time as its scheduled time, so it scores as of today
    in the business time zone.
    """
    if isinstance(as_of, str):
        return dt.date.fromisoformat(as_of)
    if isinstance(as_of, dt.datetime):
        return as_of.date()
    if as_of is not None:
        return as_of
    scheduled = runtime_flow_run.scheduled_start_time
    moment = pd.Timestamp(scheduled) if scheduled is not None else pd.Timestamp.now(tz="UTC")
    if moment.tzinfo is None:
        moment = moment.tz_localize("UTC")
    return moment.tz_convert(settings.business_timezone).date()


def run_nightly(
    settings: Settings,
    as_of: dt.date,
    flow_name: str = "nightly-scores",
    retrain: bool = True,
    champions_as_of: dt.date | None = None,
) -> NightlyResult:
    """Run every stage for ``as_of`` inside the current flow run and publish the scores.

    The run holds the warehouse lock (fulcrum/lock.py) from its audit row to its last write,
    so two runs never interleave their rows. With ``champions_as_of`` it scores with the
    models that were champion for that data date, instead of the current champions.
    """
    run_logger = get_run_logger()
    flow_run_id = runtime_flow_run.id
    run_id = uuid.uuid4().hex
    warehouse = Warehouse.from_settings(settings)
    lock = RunLock.from_settings(warehouse.engine, settings)
    try:
        lock.acquire(run_id, flow_run_id, run_logger)
    except RunLockTimeout as exc:
        record_lock_timeout(warehouse, run_id, flow_run_id, flow_name, as_of, exc)
        run_logger.error("Run %s as of %s did not start: %s", run_id, as_of, exc)
        raise StageError("lock", exc) from exc
    try:
        return run_stages(
            settings, warehouse, as_of, run_id, flow_run_id, flow_name, retrain, champions_as_of
        )
    finally:
        lock.release(run_id, run_logger)


def record_lock_timeout(
    warehouse: Warehouse,
    run_id: str,
    flow_run_id: str | None,
    flow_name: str,
    as_of: dt.date,
    exc: RunLockTimeout,
) -> None:
    """Leave the failed audit row of a run that never got the warehouse lock.

    Only this run's own score_runs row is written, so the run holding the lock is not disturbed.
    """
    warehouse.create_output_tables()
    record_run_start(warehouse, run_id, flow_run_id, flow_name, as_of)
    record_run_end(
        warehouse, run_id, "failed", failed_stage="lock", message=f"{type(exc).__name__}: {exc}"
    )


@measured
def check_mlflow_store(settings: Settings) -> None:
    """Raise TrackingStoreError when the run needs MLflow and cannot reach its tracking store.

    Only runs with CRM sources train or score, so a run without them skips the check.
    """
    if settings.has_crm:
        uri = settings.mlflow_tracking_uri.get_secret_value()
        check_tracking_store(uri, settings.experiment_name)


def run_stages(
    settings: Settings,
    warehouse: Warehouse,
    as_of: dt.date,
    run_id: str,
    flow_run_id: str | None,
    flow_name: str,
    retrain: bool,
    champions_as_of: dt.date | None,
) -> NightlyResult:
    """Run every stage for ``as_of`` and publish the scores; the caller holds the lock."""
    run_logger = get_run_logger()
    warehouse.create_output_tables()
    warehouse.fail_abandoned_runs(dt.timedelta(hours=settings.stale_run_after_hours))
    record_run_start(warehouse, run_id, flow_run_id, flow_name, as_of)
    cutoff = as_of_cutoff(as_of, settings.business_timezone)
    result = NightlyResult(run_id=run_id, as_of=as_of, status="running")
    result.flow_run_id = None if flow_run_id is None else str(flow_run_id)
    run_logger.info(
        "Scoring as of %s (cutoff %s UTC) on warehouse %s, run %s",
        as_of, cutoff.strftime("%Y-%m-%d %H:%M"), redact_url(warehouse.display_url), run_id,
    )

    clock = StageClock(result.stage_seconds, result.stage_peak_mib)
    stage = clock.start("mlflow")
    try:
        check_mlflow_store(settings)

        stage = clock.start("extract")
        frames = extract_sources_task(settings, as_of)
        result.stage_rows["extract"] = result.stage_rows["validate"] = sum(frames.row_counts().values())

        stage = clock.start("validate")
        report = validate_sources_task(frames, as_of, cutoff, settings, settings.var_dir / "validation")
        result.validation_summary = report.summary()
        report.raise_for_failures()
        # The warehouse counts events and adds up invoice lines from here on, so the two
        # largest sources need not stay in memory.
        frames = release_aggregated_sources(frames)

        stage = clock.start("labels")
        if settings.has_billing:
            account_ltv = label_accounts_in_warehouse_task(warehouse, cutoff, settings)
        else:
            account_ltv = empty_account_ltv()
            result.notes.append(
                "skipped LTV labels and the value model: billing_accounts and invoices are "
                "declared absent, so scores carry no predicted_ltv"
            )
        result.accounts_labelled = len(account_ltv)
        result.stage_rows["labels"] = len(account_ltv)

        lead_scores, frontier = empty_lead_scores(), empty_frontier()
        if settings.has_crm:
            # A run that does not retrain needs no training sets.
            if retrain:
                stage = clock.start("features")
                conversion_set, value_set = build_training_sets_task(
                    frames, account_ltv, cutoff, settings, warehouse
                )
                result.stage_rows["features"] = len(conversion_set.frame) + len(value_set.frame)
                result.stage_rows["train"] = result.stage_rows["features"]

                stage = clock.start("train")
                tags = {
                    "prefect_flow_run_id": str(flow_run_id),
                    "as_of": as_of.isoformat(),
                    "fulcrum_run_id": run_id,
                }
                train_both_models(result, conversion_set, value_set, settings, tags, as_of)
                del conversion_set, value_set

            stage = clock.start("score")
            lead_scores, frontier = score_open_leads(
                result, frames, cutoff, settings, champions_as_of, warehouse
            )
            result.stage_rows["score"] = len(lead_scores)
        else:
            result.notes.append(
                "skipped features, both models and scoring: leads and opportunities are "
                "declared absent, so only account_ltv is published"
            )

        stage = clock.start("publish")
        result.previous_model_versions = previous_model_versions(warehouse, as_of)
        result.rows_published = publish_scores_task(
            warehouse, as_of, run_id, lead_scores, account_ltv, frontier
        )
        result.stage_rows["publish"] = sum(result.rows_published.values())
    except Exception as exc:
        clock.stop()
        result.status = "failed"
        try:
            record_run_end(
                warehouse,
                run_id,
                "failed",
                failed_stage=stage,
                message=f"{type(exc).__name__}: {exc}",
                validation_summary=result.validation_summary or None,
                accounts_labelled=result.accounts_labelled or None,
            )
        except SQLAlchemyError as record_error:
            # A warehouse that failed the stage may also reject the audit update. The row
            # then stays 'running' until a later run marks it failed as abandoned.
            run_logger.error(
                "Could not record the failure of run %s in score_runs: %s", run_id, record_error
            )
        run_logger.error("Run %s as of %s failed in stage %s: %s", run_id, as_of, stage, exc)
        raise StageError(stage, exc) from exc

    clock.stop()
    result.status = "succeeded"
    record_run_end(
        warehouse,
        run_id,
        "succeeded",
        leads_scored=result.leads_scored,
        accounts_labelled=result.accounts_labelled,
        conversion_model_version=result.conversion_model_version,
        value_model_version=result.value_model_version,
        validation_summary=result.validation_summary,
        metrics={
            "metrics": result.metrics,
            "notes": result.notes,
            "stage_seconds": {name: round(seconds, 3) for name, seconds in result.stage_seconds.items()},
        },
    )
    publish_run_artifacts(result, settings)
    run_logger.info(
        "Run %s as of %s succeeded: %d leads scored, %d accounts labelled",
        run_id, as_of, result.leads_scored, result.accounts_labelled,
    )
    return result


def train_both_models(
    result: NightlyResult,
    conversion_set: FeatureSet,
    value_set: FeatureSet,
    settings: Settings,
    tags: dict[str, str],
    as_of: dt.date,
) -> None:
    """Retrain both models and record their metrics and promotion outcome on ``result``."""
    outcomes = [
        train_conversion_task(conversion_set.frame, feature_spec(conversion_set), settings, tags, as_of)
    ]
    if settings.has_billing:
        outcomes.append(train_value_task(value_set.frame, feature_spec(value_set), settings, tags, as_of))
    for outcome in outcomes:
        result.metrics[outcome.kind] = dict(outcome.metrics)
        result.registrations[outcome.kind] = outcome
        if not outcome.promoted:
            result.notes.append(f"{outcome.kind} model: {outcome.reason}")


@measured
def release_aggregated_sources(frames: SourceFrames) -> SourceFrames:
    """Return ``frames`` with lead_events and invoices emptied, keeping their columns."""
    return replace(
        frames,
        lead_events=frames.lead_events.iloc[0:0].copy(),
        invoices=frames.invoices.iloc[0:0].copy(),
    )


def score_open_leads(
    result: NightlyResult,
    frames: SourceFrames,
    cutoff: pd.Timestamp,
    settings: Settings,
    champions_as_of: dt.date | None = None,
    warehouse: Warehouse | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every open lead with the champions and compute the frontier.

    Features are built ``settings.chunk_rows`` leads at a time, with activity counted in
    ``warehouse`` (in pandas from ``frames`` without it), and each chunk is scored before
    the next is built. With ``settings.dask_address`` the chunks are scored on Dask.
    """
    conversion_champion = load_scoring_model(result, settings, "conversion", champions_as_of)
    if conversion_champion is None:
        raise RuntimeError(
            "no conversion model is registered yet and this run could not train one; "
            "see the warning of the train-conversion-model task for the reason"
        )
    value_champion = None
    if settings.has_billing:
        value_champion = load_scoring_model(result, settings, "value", champions_as_of)
    if value_champion is None and settings.has_billing:
        result.notes.append("no value model is registered yet: predicted_ltv is left empty")
    event_types = event_types_from_columns(conversion_champion.spec.input_columns)
    with ExitStack() as stack:
        activity = None
        if warehouse is not None:
            connection = stack.enter_context(warehouse.engine.connect())
            activity = WarehouseActivity(connection, settings, cutoff)
        chunks = (
            features.frame
            for features in iter_scoring_features(
                frames, cutoff, event_types, settings.chunk_rows, activity
            )
        )
        if settings.dask_address:
            lead_scores = score_feature_chunks_on_dask(
                chunks, conversion_champion, value_champion, settings
            )
        else:
            lead_scores = score_leads_task(chunks, conversion_champion, value_champion, settings)
    frontier = compute_frontier_task(lead_scores, settings.rep_capacity)
    result.conversion_model_version = conversion_champion.version
    result.value_model_version = value_champion.version if value_champion else None
    for champion in (conversion_champion, value_champion):
        if champion is not None and champion.run_id:
            result.scoring_run_ids[champion.kind] = champion.run_id
    result.leads_scored = len(lead_scores)
    result.frontier = frontier
    return lead_scores, frontier


@measured
def load_scoring_model(
    result: NightlyResult, settings: Settings, kind: ModelKind, champions_as_of: dt.date | None
) -> ChampionModel | None:
    """Load the current champion, or the one of ``champions_as_of``, and note which on ``result``.

    When the registry records no champion for that date, the current champion scores and a
    note records it, because the scores may then use a model trained on later data.
    """
    if champions_as_of is None:
        return load_champion(settings, kind)

    version = champion_version_as_of(settings, kind, champions_as_of)
    if version is not None:
        result.notes.append(
            f"{kind} model: scored with version {version}, the champion as of {champions_as_of}"
        )
        return load_model_version(settings, kind, version)

    current = load_champion(settings, kind)
    if current is not None:
        result.notes.append(
            f"{kind} model: the registry records no champion as of {champions_as_of}, so the "
            f"current champion version {current.version} scored"
        )
    return current


@measured
def previous_model_versions(warehouse: Warehouse, as_of: dt.date) -> dict[str, str | None] | None:
    """Return the model versions and date of the newest succeeded run before ``as_of``, or None."""
    previous = previous_successful_run(warehouse, as_of)
    if previous is None:
        return None
    return {
        "as_of": previous["as_of"].isoformat(),
        "conversion": previous["conversion_model_version"],
        "value": previous["value_model_version"],
    }


def empty_account_ltv() -> pd.DataFrame:
    return pd.DataFrame(columns=ACCOUNT_LTV_COLUMNS)


def empty_lead_scores() -> pd.DataFrame:
    return pd.DataFrame(columns=SCORE_COLUMNS)


def empty_frontier() -> pd.DataFrame:
    return pd.DataFrame(columns=FRONTIER_COLUMNS)


@flow(name="nightly-scores", description="Score every open lead on conversion and account value")
def nightly_scores(as_of: dt.date | None = None, retrain: bool = True) -> NightlyResult:
    """Score every open lead as of ``as_of`` (default: the scheduled date in the business zone)."""
    settings = load_settings()
    return run_nightly(settings, resolve_as_of(as_of, settings), retrain=retrain)
