"""Extract: read the five sources from the warehouse as they stood at the as-of cutoff."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import pandas as pd
import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from fulcrum.timing import measured
from fulcrum.contract import SOURCES, SourceContract
from fulcrum.settings import Settings
from fulcrum.warehouse import (
    WarehouseLockedError,
    check_source_columns,
    create_engine_for,
    describe_database_error,
    is_transient_error,
    read_only_connection,
    source_selectable,
)

logger = logging.getLogger(__name__)

# Rows are pre-filtered in SQL against the cutoff plus this margin, then filtered exactly
# in pandas. Text timestamps with offsets or a 'T' separator do not compare correctly as
# strings, and the margin keeps every row that could still fall before the cutoff.
SQL_FILTER_MARGIN = pd.Timedelta(days=2)

# Later facts about rows that existed at the cutoff: (timestamp column, columns it reveals).
MASKED_FACTS = {
    "leads": [("disqualified_at", [])],
    "opportunities": [("closed_at", ["won", "account_id"])],
    "billing_accounts": [("cancelled_at", [])],
}


class ExtractError(RuntimeError):
    """A source could not be read or its values could not be parsed."""


@dataclass
class SourceFrames:
    """The five sources as DataFrames with the contract's column names, UTC-aware timestamps."""

    leads: pd.DataFrame
    lead_events: pd.DataFrame
    opportunities: pd.DataFrame
    billing_accounts: pd.DataFrame
    invoices: pd.DataFrame

    def items(self):
        return {
            "leads": self.leads,
            "lead_events": self.lead_events,
            "opportunities": self.opportunities,
            "billing_accounts": self.billing_accounts,
            "invoices": self.invoices,
        }.items()

    def row_counts(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.items()}


def as_of_cutoff(as_of: dt.date, timezone: str) -> pd.Timestamp:
    """Return the UTC instant at which ``as_of`` starts in the business time zone."""
    local_midnight = dt.datetime.combine(as_of, dt.time(0, 0), tzinfo=ZoneInfo(timezone))
    return pd.Timestamp(local_midnight).tz_convert("UTC")


def to_utc(values: pd.Series, table: str, column: str) -> pd.Series:
    """Parse a column of timestamps into UTC-aware ones; naive values are taken as UTC.

    Raises ExtractError naming the table, column and a few unparsable values.
    """
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    if pd.api.types.is_datetime64_dtype(values):
        return values.dt.tz_localize("UTC").astype("datetime64[ns, UTC]")
    present = values.notna()
    if not present.any():
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    texts = values.astype("string")
    parsed = pd.to_datetime(texts, utc=True, errors="coerce", format="ISO8601")
    retry = present & parsed.isna()
    if retry.any():
        parsed.loc[retry] = pd.to_datetime(texts[retry], utc=True, errors="coerce", format="mixed")
    bad = present & parsed.isna()
    if bad.any():
        examples = values[bad].drop_duplicates().head(3).tolist()
        raise ExtractError(
            f"{table}.{column}: {int(bad.sum())} value(s) are not timestamps "
            f"(examples: {examples}); store ISO 8601 timestamps in UTC or cast them in the mapping"
        )
    return parsed.astype("datetime64[ns, UTC]")


def _selected_columns(contract: SourceContract, selectable: sa.FromClause) -> list[sa.ColumnElement]:
    names = contract.column_names
    if contract.extra_columns_allowed:
        names = names + [c.name for c in selectable.columns if c.name not in contract.column_names]
    return [selectable.c[name] for name in names]


def build_source_query(
    engine: Engine, name: str, settings: Settings, cutoff: pd.Timestamp
) -> sa.Select:
    """Build the SELECT that reads source ``name`` up to a little past ``cutoff``."""
    contract = SOURCES[name]
    selectable = source_selectable(engine, name, settings.sources[name])
    check_source_columns(name, selectable)
    created = selectable.c[contract.created_column]
    bound = (cutoff + SQL_FILTER_MARGIN).to_pydatetime()
    if engine.dialect.name == "sqlite":
        # SQLite stores timestamps as text; ISO strings compare in time order.
        condition = created < bound.strftime("%Y-%m-%d %H:%M:%S")
    else:
        condition = sa.cast(created, sa.DateTime(timezone=True)) < bound
    return sa.select(*_selected_columns(contract, selectable)).where(condition)


def read_source(engine: Engine, name: str, query: sa.Select, chunk_rows: int) -> pd.DataFrame:
    """Read one source in chunks, on a read-only connection, and return it with contract types."""
    contract = SOURCES[name]
    chunks = []
    with read_only_connection(engine) as connection:
        # A server-side cursor on PostgreSQL, so that rows arrive chunk by chunk instead of
        # all at once in the driver's buffer. Each chunk is typed as it arrives, so the
        # untyped rows of only one chunk are in memory at a time.
        connection = connection.execution_options(stream_results=True, max_row_buffer=chunk_rows)
        for chunk in pd.read_sql_query(query, connection, chunksize=chunk_rows):
            chunks.append(coerce_source_types(chunk, contract))
    if not chunks:
        empty = pd.DataFrame(columns=[c.name for c in query.selected_columns])
        return coerce_source_types(empty, contract)
    if len(chunks) == 1:
        return chunks[0]
    return pd.concat(chunks, ignore_index=True)


def coerce_source_types(frame: pd.DataFrame, contract: SourceContract) -> pd.DataFrame:
    """Cast contract columns: ids to strings, timestamps to UTC, won to nullable boolean.

    Amounts stay as read, so that validation can report text in a numeric column.
    """
    frame = frame.copy()
    for column in contract.columns:
        values = frame[column.name]
        if column.kind == "timestamp":
            frame[column.name] = to_utc(values, contract.name, column.name)
        elif column.kind == "string":
            if pd.api.types.is_string_dtype(values.dtype) and values.dtype != object:
                # The text is already stored compactly, and Python objects would take
                # several times the memory.
                continue
            frame[column.name] = values.astype("object").where(values.notna(), None)
            frame[column.name] = frame[column.name].map(
                lambda value: value if value is None or isinstance(value, str) else str(value)
            )
        elif column.kind == "boolean":
            frame[column.name] = _to_nullable_boolean(values, contract.name, column.name)
        elif column.kind in ("integer", "float") and column.name not in ("amount", "cost"):
            frame[column.name] = pd.to_numeric(values, errors="coerce").astype("float64")
    return frame


def _to_nullable_boolean(values: pd.Series, table: str, column: str) -> pd.Series:
    mapping = {"true": True, "t": True, "1": True, "yes": True,
               "false": False, "f": False, "0": False, "no": False}
    result = pd.Series(pd.NA, index=values.index, dtype="boolean")
    present = values.notna()
    texts = values[present].astype(str).str.strip().str.lower()
    texts = texts.str.replace(r"\.0$", "", regex=True)
    mapped = texts.map(mapping)
    bad = mapped.isna()
    if bad.any():
        examples = values[present][bad].drop_duplicates().head(3).tolist()
        raise ExtractError(f"{table}.{column}: values are not booleans (examples: {examples})")
    result.loc[present] = mapped.astype(bool).to_numpy()
    return result


def restrict_to_cutoff(frame: pd.DataFrame, contract: SourceContract, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Drop rows created at or after ``cutoff`` and hide facts learned after it."""
    frame = frame.loc[frame[contract.created_column] < cutoff].reset_index(drop=True)
    for fact_column, revealed in MASKED_FACTS.get(contract.name, []):
        later = frame[fact_column] >= cutoff
        if not later.any():
            continue
        frame.loc[later, fact_column] = pd.NaT
        for column in revealed:
            frame.loc[later, column] = pd.NA if column == "won" else None
    return frame


def empty_source(contract: SourceContract) -> pd.DataFrame:
    """Return a zero-row frame with the contract's columns and types, for an absent source."""
    return coerce_source_types(pd.DataFrame(columns=contract.column_names), contract)


def read_source_with_retries(
    engine: Engine, name: str, settings: Settings, cutoff: pd.Timestamp
) -> pd.DataFrame:
    """Query one source, trying again after each delay in ``extract_retry_delays_seconds``.

    Only transient failures are tried again: a dropped connection or a lock timeout. A SQL
    error, or a transient one that outlasts every retry, raises ExtractError naming the source.
    """
    delays = list(settings.extract_retry_delays_seconds)
    attempts = len(delays) + 1
    for attempt in range(1, attempts + 1):
        try:
            query = build_source_query(engine, name, settings, cutoff)
            return read_source(engine, name, query, settings.chunk_rows)
        except (SQLAlchemyError, WarehouseLockedError, pd.errors.DatabaseError) as caught:
            exc = _unwrap_pandas_error(caught)
            error = describe_database_error(exc)
            if not is_transient_error(exc):
                raise ExtractError(
                    f"reading source {name!r} failed: {error}. Check the source mapping of "
                    f"{name!r} and the table it reads"
                ) from exc
            if attempt == attempts:
                raise ExtractError(
                    f"reading source {name!r} failed on all {attempts} attempt(s), the last "
                    f"with {error}. Check that the warehouse is reachable. "
                    f"extract_retry_delays_seconds sets the retries"
                ) from exc
            _run_logger().warning(
                "reading source %s failed on attempt %d of %d (%s); trying again in %g s",
                name, attempt, attempts, error, delays[attempt - 1],
            )
            time.sleep(delays[attempt - 1])
    raise AssertionError("unreachable: the loop returns or raises")


def _unwrap_pandas_error(error: BaseException) -> BaseException:
    # pandas.read_sql_query wraps SQLAlchemy's error, which records whether the connection dropped.
    if isinstance(error, pd.errors.DatabaseError) and error.__cause__ is not None:
        return error.__cause__
    return error


def extract_sources(
    settings: Settings, as_of: dt.date, engine: Engine | None = None
) -> SourceFrames:
    """Read all five sources as they stood at the start of ``as_of`` in the business zone."""
    own_engine = engine is None
    if own_engine:
        engine = create_engine_for(
            settings.warehouse_url.get_secret_value(), settings.warehouse_lock_timeout_seconds
        )
    cutoff = as_of_cutoff(as_of, settings.business_timezone)
    frames = {}
    try:
        for name in SOURCES:
            if settings.sources[name].absent:
                frames[name] = empty_source(SOURCES[name])
                logger.info("skipped %s: the source is declared absent", name)
                continue
            raw = read_source_with_retries(engine, name, settings, cutoff)
            frames[name] = restrict_to_cutoff(raw, SOURCES[name], cutoff)
            logger.info("extracted %s: %d rows as of %s", name, len(frames[name]), as_of)
    finally:
        if own_engine:
            engine.dispose()
    return SourceFrames(**frames)


# No Prefect retries, because each source read retries transient failures on its own.
# The result is not stored: pickling a million leads' sources doubled peak memory and left
# revenue data on disk, and Prefect's in-memory store kept every date of a backfill.
@task(
    name="extract-sources",
    cache_policy=NO_CACHE,
    persist_result=False,
    cache_result_in_memory=False,
)
@measured
def extract_sources_task(settings: Settings, as_of: dt.date) -> SourceFrames:
    run_logger = get_run_logger()
    frames = extract_sources(settings, as_of)
    counts = ", ".join(f"{name} {count:,}" for name, count in frames.row_counts().items())
    run_logger.info("Extracted sources as of %s: %s rows", as_of, counts)
    return frames


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    # Outside a flow run (tests calling the plain functions) the module logger takes over.
    try:
        return get_run_logger()
    except MissingContextError:
        return logger
