"""The backfill-scores flow: the nightly stages for a range of past dates, oldest first.

Each date runs as its own subflow run (``backfill-date``), so the Prefect UI shows one flow
run per date, with that date's logs, summary artifact and, when it fails, the stage and the
reason in its state message. A failed date is reported and the next date runs. The parent
run fails at the end when any date failed, and its state message lists those dates.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import State
from tqdm import tqdm

from flows.nightly import NightlyResult, run_nightly
from flows.reporting import render_backfill_markdown
from fulcrum.lock import RunLock
from fulcrum.settings import Settings, load_settings
from fulcrum.warehouse import Warehouse
from tasks.publish import latest_successful_run

logger = logging.getLogger(__name__)

Every = Literal["day", "week", "month"]
EVERY_CHOICES = ("day", "week", "month")
PROGRESS_ARTIFACT_KEY = "backfill-progress"
SUMMARY_ARTIFACT_KEY = "backfill-summary"
# Failed dates named in the error, and so in the flow run's state message; the summary
# artifact lists all of them.
MAX_LISTED_FAILURES = 20


class BackfillError(RuntimeError):
    """One or more dates of a backfill failed; the message lists each with its reason."""

    def __init__(self, report: BackfillReport) -> None:
        self.report = report
        failed = report.failed
        listed = "; ".join(
            f"{outcome.as_of} ({outcome.detail})" for outcome in failed[:MAX_LISTED_FAILURES]
        )
        if len(failed) > MAX_LISTED_FAILURES:
            listed += (
                f"; and {len(failed) - MAX_LISTED_FAILURES} more, listed in the "
                f"{SUMMARY_ARTIFACT_KEY} artifact"
            )
        super().__init__(
            f"{len(failed)} of {len(report.outcomes)} backfill dates failed: {listed}"
        )


@dataclass
class DateOutcome:
    """Outcome of one backfill date: succeeded, failed or skipped, with the reason."""

    as_of: dt.date
    status: Literal["succeeded", "failed", "skipped"]
    run_id: str | None = None
    detail: str = ""


@dataclass
class BackfillReport:
    """The dates of one backfill, in the order they ran, with each one's outcome."""

    every: str
    retrain: bool
    force: bool
    outcomes: list[DateOutcome] = field(default_factory=list)

    def with_status(self, status: str) -> list[DateOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == status]

    @property
    def failed(self) -> list[DateOutcome]:
        return self.with_status("failed")

    def describe(self) -> str:
        """Render one line per date and a count line, for the terminal."""
        lines = [
            f"{outcome.as_of}  {outcome.status:<9}  {outcome.run_id or '-':<32}  {outcome.detail}"
            for outcome in self.outcomes
        ]
        counts = ", ".join(
            f"{len(self.with_status(status))} {status}"
            for status in ("succeeded", "skipped", "failed")
        )
        noun = "date" if len(self.outcomes) == 1 else "dates"
        lines.append(f"{len(self.outcomes)} {noun}: {counts}")
        return "\n".join(lines)


def parse_date_parameter(value: Any, name: str) -> dt.date:
    """Return ``value`` as a date; it may be a date or an ISO string such as '2024-02-29'."""
    if isinstance(value, dt.datetime):
        raise ValueError(f"{name} must be a date without a time of day. Got {value!r}.")
    if isinstance(value, dt.date):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} must be an ISO date such as '2024-02-29'. Got {value!r}.")
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(
            f"{name} must be a valid ISO date such as '2024-02-29'. Got {value!r}: {exc}."
        ) from exc


def backfill_dates(start: Any, end: Any, every: str = "day") -> list[dt.date]:
    """Return the data dates from ``start`` to ``end`` inclusive, oldest first.

    ``every='week'`` steps 7 days from ``start``. ``every='month'`` keeps the day of the month
    of ``start``, moved back to the month's last day where the month is shorter, so a start on
    January 31 gives February 29 (in a leap year), then March 31. Raises ValueError for an
    invalid date, an unknown step, or an end before the start.
    """
    first = parse_date_parameter(start, "start")
    last = parse_date_parameter(end, "end")
    if every not in EVERY_CHOICES:
        raise ValueError(f"every must be one of {list(EVERY_CHOICES)}. Got {every!r}.")
    if last < first:
        raise ValueError(f"end must not be before start. Got start {first}, end {last}.")

    dates = []
    step = 0
    current = first
    while current <= last:
        dates.append(current)
        step += 1
        if every == "day":
            current = first + dt.timedelta(days=step)
        elif every == "week":
            current = first + dt.timedelta(weeks=step)
        else:
            current = add_months(first, step)
    return dates


def add_months(day: dt.date, months: int) -> dt.date:
    """Return the date ``months`` calendar months after ``day``, clipped to the month's end."""
    month_index = day.month - 1 + months
    year, month = day.year + month_index // 12, month_index % 12 + 1
    last_day = calendar.monthrange(year, month)[1]
    return dt.date(year, month, min(day.day, last_day))


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false. Got {value!r}.")
    return value


@flow(
    name="backfill-date",
    flow_run_name="as-of-{as_of}",
    description="Score every open lead as of one past date, for the backfill-scores flow",
)
def backfill_date(as_of: dt.date, retrain: bool = False) -> NightlyResult:
    """Run the nightly stages as of ``as_of`` with the models that were champion then."""
    settings = load_settings()
    return run_nightly(
        settings, as_of, flow_name="backfill-scores", retrain=retrain, champions_as_of=as_of
    )


class BackfillProgress:
    """Progress shown in the Prefect UI (a progress artifact) and in a terminal (tqdm)."""

    def __init__(self, dates: list[dt.date]) -> None:
        self.total = len(dates)
        self.done = 0
        self.failed = 0
        # tqdm draws nothing when stderr is not a terminal, as under a Prefect worker.
        self.bar = tqdm(
            total=self.total, unit="date", desc="backfill", file=sys.stderr, disable=None
        )
        self.artifact_id = create_progress_artifact(
            progress=0.0,
            key=PROGRESS_ARTIFACT_KEY,
            description=f"Backfill of {self.total} dates, {dates[0]} to {dates[-1]}: starting",
        )

    def start(self, as_of: dt.date) -> None:
        self.bar.set_postfix_str(f"as of {as_of}")

    def finish(self, outcome: DateOutcome) -> None:
        self.done += 1
        self.failed += outcome.status == "failed"
        if outcome.status == "skipped":
            # A skipped date takes no time, so it leaves the bar's total instead of making
            # tqdm's rate, and with it the estimated time left, look faster than scoring is.
            self.bar.total -= 1
            self.bar.refresh()
        else:
            self.bar.update(1)
        update_progress_artifact(
            self.artifact_id,
            progress=100.0 * self.done / self.total,
            description=(
                f"{self.done} of {self.total} dates done, {self.failed} failed; "
                f"last: {outcome.as_of} {outcome.status}"
            ),
        )

    def close(self) -> None:
        self.bar.close()


def run_backfill(
    settings: Settings,
    dates: list[dt.date],
    every: str,
    retrain: bool,
    force: bool,
) -> BackfillReport:
    """Score each date in order, skipping dates that already succeeded unless ``force``."""
    run_logger = get_run_logger()
    warehouse = Warehouse.from_settings(settings)
    prepare_output_tables(warehouse, settings, run_logger)
    report = BackfillReport(every=every, retrain=retrain, force=force)
    progress = BackfillProgress(dates)

    try:
        for position, as_of in enumerate(dates, start=1):
            progress.start(as_of)
            previous = None if force else latest_successful_run(warehouse, as_of)
            if previous is not None:
                finished = previous["finished_at"]
                outcome = DateOutcome(
                    as_of,
                    "skipped",
                    run_id=previous["run_id"],
                    detail=(
                        f"already scored by a run that finished at {finished:%Y-%m-%d %H:%M} "
                        f"UTC; set force to score it again"
                    ),
                )
            else:
                state = backfill_date(as_of=as_of, retrain=retrain, return_state=True)
                outcome = outcome_from_state(as_of, state)
            report.outcomes.append(outcome)
            progress.finish(outcome)
            log = run_logger.warning if outcome.status == "failed" else run_logger.info
            log(
                "Backfill date %s (%d of %d): %s. %s",
                as_of, position, len(dates), outcome.status, outcome.detail,
            )
    finally:
        progress.close()
    return report


def prepare_output_tables(warehouse: Warehouse, settings: Settings, log) -> None:
    """Create or upgrade the output tables, so score_runs can be read for the skip check.

    It holds the run lock meanwhile, because a nightly run may be creating them at the same time.
    """
    lock = RunLock.from_settings(warehouse.engine, settings)
    lock_id = uuid.uuid4().hex
    with lock.hold(lock_id, runtime_flow_run.id, log):
        warehouse.create_output_tables()


def outcome_from_state(as_of: dt.date, state: State) -> DateOutcome:
    """Turn the final state of a ``backfill-date`` subflow run into the date's outcome."""
    value = state.result(raise_on_failure=False)
    if state.is_completed() and isinstance(value, NightlyResult):
        models = (
            f"conversion v{value.conversion_model_version or '-'}, "
            f"value v{value.value_model_version or '-'}"
        )
        return DateOutcome(
            as_of,
            "succeeded",
            run_id=value.run_id,
            detail=f"{value.leads_scored:,} leads scored with {models}",
        )
    reason = str(value) if isinstance(value, BaseException) else (state.message or state.name)
    return DateOutcome(as_of, "failed", detail=reason)


@flow(
    name="backfill-scores",
    description="Score past dates point in time, oldest first, one subflow run per date",
    # Dates are parsed by backfill_dates, whose errors name the parameter and the rule.
    validate_parameters=False,
)
def backfill_scores(
    start: dt.date,
    end: dt.date,
    every: Every = "day",
    retrain: bool = False,
    force: bool = False,
) -> BackfillReport:
    """Score each date from ``start`` to ``end`` as the nightly run would have.

    With ``retrain`` false each date is scored with the models that were champion for it
    (see `flows.nightly.load_scoring_model`). Dates with a succeeded run are skipped unless
    ``force``. Raises BackfillError, listing the failed dates, after every date has run.
    """
    dates = backfill_dates(start, end, every)
    check_flag(retrain, "retrain")
    check_flag(force, "force")
    settings = load_settings()
    run_logger = get_run_logger()
    run_logger.info(
        "Backfilling %d dates from %s to %s, every %s (retrain=%s, force=%s)",
        len(dates), dates[0], dates[-1], every, retrain, force,
    )

    report = run_backfill(settings, dates, every, retrain, force)
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY,
        markdown=render_backfill_markdown(report),
        description=f"Fulcrum backfill from {dates[0]} to {dates[-1]}",
    )
    if report.failed:
        raise BackfillError(report)
    return report
