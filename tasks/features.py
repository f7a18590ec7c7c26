"""Features: point-in-time lead features, and the training sets of both models.

A feature at time ``t`` uses only what existed before ``t``: lead attributes, and activity
events that occurred before ``t``. Training rows for the conversion model are open leads
at snapshot times far enough in the past that their whole horizon is observed before the
cutoff; the label is a won opportunity closed within the horizon after the snapshot.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection

from fulcrum.timing import measured
from fulcrum.contract import LEADS
from fulcrum.settings import Settings
from fulcrum.sqltime import epoch_seconds, to_epoch_seconds
from fulcrum.warehouse import Warehouse, check_source_columns, source_selectable
from tasks.extract import SourceFrames

logger = logging.getLogger(__name__)

ACTIVITY_WINDOWS_DAYS = (7, 30, 90)
MAX_EVENT_TYPES = 20
MAX_CATEGORICAL_LEVELS = 200
DAY = pd.Timedelta(days=1)

# Lead columns that are never features: keys and facts about the lead's outcome.
NON_FEATURE_LEAD_COLUMNS = {"lead_id", "created_at", "disqualified_at"}


@dataclass
class FeatureSet:
    """One row per (lead, feature time): ``lead_id``, ``feature_time`` and model inputs."""

    frame: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def input_columns(self) -> list[str]:
        return self.numeric + self.categorical


def slugify_event_type(event_type: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", str(event_type).lower()).strip("_")
    return slug[:40] or "unnamed"


def select_event_types(events: pd.DataFrame) -> list[str]:
    """Return the most frequent event type slugs, at most MAX_EVENT_TYPES of them, sorted."""
    if events.empty:
        return []
    counts = events["event_type"].map(slugify_event_type).value_counts()
    return sorted(counts.index[:MAX_EVENT_TYPES].tolist())


def event_types_from_columns(columns: list[str]) -> list[str]:
    """Recover the event type slugs a trained model expects from its input column names."""
    return sorted({m.group(1) for c in columns if (m := re.fullmatch(r"evt_(.+)_30d", c))})


def lead_attribute_columns(leads: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Split lead attribute columns into numeric and categorical model inputs.

    Extra columns beyond the contract are candidate features: numbers and booleans become
    numeric inputs, text becomes categorical unless it is nearly unique per lead (an id or
    free text), and timestamps are left out because their meaning is unknown.
    """
    numeric, categorical = [], []
    for name in leads.columns:
        if name in NON_FEATURE_LEAD_COLUMNS:
            continue
        values = leads[name]
        if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
            continue
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            numeric.append(name)
            continue
        distinct = values.nunique(dropna=True)
        if name in LEADS.column_names or distinct <= max(MAX_CATEGORICAL_LEVELS, 0.05 * len(values)):
            categorical.append(name)
    return numeric, categorical


def lead_attributes(leads: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """Return the attribute inputs with uniform types: float64 with NaN, object with None."""
    attributes = pd.DataFrame({"lead_id": leads["lead_id"].to_numpy()})
    for name in numeric:
        values = leads[name]
        if pd.api.types.is_bool_dtype(values) or values.dtype == object:
            values = values.astype("object").map(_boolean_or_number)
        attributes[name] = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    for name in categorical:
        values = leads[name].astype("object")
        attributes[name] = values.where(values.notna(), None).map(
            lambda value: value if value is None else str(value).strip() or None
        ).to_numpy()
    return attributes


def _boolean_or_number(value):
    if value is None or value is pd.NA:
        return np.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    return value


def first_conversions(opportunities: pd.DataFrame) -> pd.Series:
    """Return the first won close time per lead id."""
    won = opportunities.loc[opportunities["won"].fillna(False).astype(bool) & opportunities["closed_at"].notna()]
    return won.groupby("lead_id")["closed_at"].min()


def activity_features(
    events: pd.DataFrame, points: pd.DataFrame, event_types: list[str]
) -> pd.DataFrame:
    """Count each lead's events before its feature time, by type and window.

    ``points`` has ``lead_id`` and ``feature_time``; the result has one row per point in the
    same order. Feature times are expected to take few distinct values (snapshots).
    """
    columns = activity_feature_columns(event_types)
    result = pd.DataFrame(0.0, index=points.index, columns=columns)
    result["days_since_last_event"] = np.nan
    result["days_since_first_event"] = np.nan
    if events.empty or points.empty:
        return result

    events = events[["lead_id", "event_type", "occurred_at"]]
    slugs = events["event_type"].map(slugify_event_type)
    events = events.assign(slug=slugs.where(slugs.isin(event_types), "__other__"))
    for feature_time, group in points.groupby("feature_time", sort=False):
        window = events.loc[
            (events["occurred_at"] < feature_time) & events["lead_id"].isin(group["lead_id"])
        ]
        if window.empty:
            continue
        age_days = (feature_time - window["occurred_at"]) / DAY
        window = window.assign(age_days=age_days.to_numpy())
        summary = _summarise_window(window, event_types)
        rows = group[["lead_id"]].join(summary, on="lead_id")
        rows = rows.drop(columns="lead_id")
        filled = rows.fillna({name: 0.0 for name in columns})
        result.loc[group.index, filled.columns] = filled.to_numpy(dtype="float64")
    return result


def activity_feature_columns(event_types: list[str]) -> list[str]:
    columns = [f"events_{days}d" for days in ACTIVITY_WINDOWS_DAYS] + ["events_total", "distinct_event_types"]
    for slug in event_types:
        columns += [f"evt_{slug}_30d", f"evt_{slug}_total"]
    return columns


def _summarise_window(window: pd.DataFrame, event_types: list[str]) -> pd.DataFrame:
    by_lead = window.groupby("lead_id")
    summary = pd.DataFrame(index=by_lead.size().index)
    for days in ACTIVITY_WINDOWS_DAYS:
        recent = window.loc[window["age_days"] <= days]
        summary[f"events_{days}d"] = recent.groupby("lead_id").size()
    summary["events_total"] = by_lead.size()
    summary["distinct_event_types"] = by_lead["slug"].nunique()
    summary["days_since_last_event"] = by_lead["age_days"].min()
    summary["days_since_first_event"] = by_lead["age_days"].max()
    typed = window.loc[window["slug"] != "__other__"]
    if not typed.empty:
        totals = typed.groupby(["lead_id", "slug"]).size().unstack(fill_value=0)
        recent = typed.loc[typed["age_days"] <= 30].groupby(["lead_id", "slug"]).size().unstack(fill_value=0)
        for slug in event_types:
            if slug in totals.columns:
                summary[f"evt_{slug}_total"] = totals[slug]
            if slug in recent.columns:
                summary[f"evt_{slug}_30d"] = recent[slug]
    return summary.astype("float64")


# Slug code of the event types outside the chosen list, which count as the one type '__other__'.
OTHER_SLUG_CODE = -1
SECONDS_PER_DAY = 86_400
# Rows of points written, and result rows read, per round trip. Python then keeps this many
# rows at a time, not a whole chunk of settings.chunk_rows.
TRANSFER_BATCH_ROWS = 10_000


def event_type_counts_in_warehouse(
    connection: Connection, settings: Settings, cutoff: pd.Timestamp
) -> pd.Series:
    """Count the lead events that occurred before ``cutoff`` per event type slug, in the warehouse.

    The database returns one row per raw event type, and the raw types are slugified here.
    The result is indexed by slug, most frequent first, with ties in slug order.
    """
    counts = pd.Series(dtype="int64", name="count", index=pd.Index([], dtype=object, name="event_type"))
    events = lead_events_source(connection, settings)
    if events is None:
        return counts

    raw_type = _raw_event_type(events)
    occurred = _occurred_seconds(events)
    query = (
        sa.select(raw_type, sa.func.count())
        .where(occurred < to_epoch_seconds(cutoff))
        .group_by(raw_type)
    )
    with _reading_only(connection):
        rows = connection.execute(query).all()
    if not rows:
        return counts

    slugs = [slugify_event_type(raw) for raw, _ in rows]
    totals = pd.Series([count for _, count in rows], index=slugs, dtype="int64")
    counts = totals.groupby(level=0).sum().sort_index()
    counts = counts.sort_values(ascending=False, kind="stable")
    counts.index.name, counts.name = "event_type", "count"
    return counts


def select_event_types_in_warehouse(
    connection: Connection, settings: Settings, cutoff: pd.Timestamp
) -> list[str]:
    """Return the slugs ``select_event_types`` picks from the events before ``cutoff``, counted in SQL.

    NOTE: when several slugs tie for the last place, this keeps the first in slug order,
    while ``select_event_types`` keeps whichever pandas' value_counts happens to list first.
    """
    counts = event_type_counts_in_warehouse(connection, settings, cutoff)
    return sorted(counts.index[:MAX_EVENT_TYPES].tolist())


def activity_features_in_warehouse(
    connection: Connection,
    settings: Settings,
    points: pd.DataFrame,
    event_types: list[str],
    cutoff: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Count each lead's events before its feature time, by type and window, in the warehouse.

    The result equals ``activity_features`` on the lead events that occurred before
    ``cutoff`` (all events when it is None): one float64 row per point, in the order and
    with the index of ``points``. The points go to a temporary table in chunks of
    ``settings.chunk_rows``, and each chunk is one aggregate query that returns a row per
    point with events, so no event row reaches Python.

    ``connection`` must be able to create temporary tables, which a ``read_only_connection``
    rejects. The queries that read the source still run read-only. The temporary tables are
    dropped before returning. After a failed statement on PostgreSQL, the caller's rollback
    removes them instead.
    """
    feature_seconds = feature_time_seconds(points)
    lead_ids = points["lead_id"]
    columns = activity_feature_columns(event_types)
    values = np.zeros((len(points), len(columns) + 2))
    values[:, len(columns):] = np.nan

    # Points without a lead or a feature time have no events, as in activity_features.
    present = np.flatnonzero(lead_ids.notna().to_numpy() & ~np.isnan(feature_seconds))
    events = lead_events_source(connection, settings)
    if events is not None and len(present):
        with _temporary_tables(connection) as (point_table, slug_table):
            _load_slug_codes(connection, slug_table, events, event_types)
            query = _activity_query(
                events, point_table, slug_table, len(event_types), cutoff, connection.dialect.name
            )
            chunks = range(0, len(present), settings.chunk_rows)
            for start in chunks:
                positions = present[start : start + settings.chunk_rows]
                _load_points(connection, point_table, positions, lead_ids, feature_seconds)
                with _reading_only(connection):
                    options = {"yield_per": TRANSFER_BATCH_ROWS}
                    with connection.execute(query, execution_options=options) as result:
                        for rows in result.partitions():
                            _store_activity_rows(values, rows)
        logger.info(
            "counted activity in the warehouse for %d points in %d chunk(s), %d of them with events",
            len(points), len(chunks), int((values[:, columns.index("events_total")] > 0).sum()),
        )

    day_columns = ["days_since_last_event", "days_since_first_event"]
    # No other reference to values remains, so the frame can own it without a copy.
    return pd.DataFrame(values, index=points.index, columns=columns + day_columns, copy=False)


def lead_events_source(connection: Connection, settings: Settings) -> sa.FromClause | None:
    """Return the selectable of the lead_events source, or None when it is declared absent."""
    spec = settings.sources["lead_events"]
    if spec.absent:
        return None
    events = source_selectable(connection.engine, "lead_events", spec)
    check_source_columns("lead_events", events)
    return events


def feature_time_seconds(points: pd.DataFrame) -> np.ndarray:
    """Return each point's feature time in seconds since the Unix epoch, NaN where it is missing."""
    missing = [name for name in ("lead_id", "feature_time") if name not in points.columns]
    if missing:
        raise ValueError(
            f"points lacks the column(s) {missing}. Pass one row per (lead_id, feature_time)."
        )
    times = points["feature_time"]
    if len(times) and not isinstance(times.dtype, pd.DatetimeTZDtype):
        raise ValueError(
            f"points.feature_time must hold timezone-aware timestamps, because event times are "
            f"UTC. Got dtype {times.dtype}. Convert them with pd.to_datetime(values, utc=True)."
        )
    # Feature times take few distinct values, and to_epoch_seconds converts each exactly.
    codes, distinct = pd.factorize(times)
    seconds = np.array([to_epoch_seconds(moment) for moment in distinct] + [np.nan])
    return seconds[codes]


def _raw_event_type(events: sa.FromClause) -> sa.ColumnElement:
    # slugify_event_type turns None into 'none' through str(), and so does 'None'.
    return sa.func.coalesce(sa.cast(events.c.event_type, sa.Text), "None").label("raw_type")


def _occurred_seconds(events: sa.FromClause) -> sa.ColumnElement:
    return sa.cast(epoch_seconds(events.c.occurred_at), sa.Float)


def _lead_key(events: sa.FromClause) -> sa.ColumnElement:
    # A SQL mapping may return numeric ids, which PostgreSQL will not compare with text.
    lead_id = events.c.lead_id
    if isinstance(lead_id.type, sa.String):
        return lead_id
    return sa.cast(lead_id, sa.Text)


@contextmanager
def _reading_only(connection: Connection) -> Iterator[None]:
    """Run the statements inside read-only, because the source may be a user's SQL mapping."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        # Rolling back to the savepoint ends read-only mode, and also clears a failed query.
        savepoint = connection.begin_nested()
        try:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            yield
        finally:
            savepoint.rollback()
    elif dialect == "sqlite":
        # A connection from read_only_connection is query-only already and stays so.
        was_query_only = connection.exec_driver_sql("PRAGMA query_only").scalar_one()
        connection.exec_driver_sql("PRAGMA query_only = ON")
        try:
            yield
        finally:
            if not was_query_only:
                connection.exec_driver_sql("PRAGMA query_only = OFF")
    else:
        yield


@contextmanager
def _temporary_tables(connection: Connection) -> Iterator[tuple[sa.Table, sa.Table]]:
    """Create the point and slug code tables under names no other call uses, and drop them after."""
    suffix = uuid.uuid4().hex[:12]
    metadata = sa.MetaData()
    points = sa.Table(
        f"fulcrum_points_{suffix}",
        metadata,
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("lead_id", sa.Text, nullable=False),
        sa.Column("feature_seconds", sa.Float, nullable=False),
        sa.Index(f"fulcrum_points_{suffix}_lead_id", "lead_id"),
        prefixes=["TEMPORARY"],
    )
    slugs = sa.Table(
        f"fulcrum_slugs_{suffix}",
        metadata,
        sa.Column("raw_type", sa.Text, primary_key=True),
        sa.Column("slug_code", sa.Integer, nullable=False),
        prefixes=["TEMPORARY"],
    )
    if connection.dialect.name == "sqlite" and not connection.connection.dbapi_connection.in_transaction:
        # Python's sqlite3 opens a transaction only before a data change. The CREATE would
        # then commit at once and the DROP join the caller's transaction, so a rollback by
        # the caller would bring the tables back.
        connection.exec_driver_sql("BEGIN")
    metadata.create_all(connection)
    try:
        yield points, slugs
    finally:
        if not _transaction_failed(connection):
            metadata.drop_all(connection)


def _transaction_failed(connection: Connection) -> bool:
    # PostgreSQL rejects every statement, DROP included, until the failed transaction is
    # rolled back, and that rollback also removes tables created in it.
    if connection.dialect.name != "postgresql":
        return False
    from psycopg import pq

    status = connection.connection.dbapi_connection.info.transaction_status
    return status == pq.TransactionStatus.INERROR


def _load_slug_codes(
    connection: Connection, slug_table: sa.Table, events: sa.FromClause, event_types: list[str]
) -> None:
    """Store the code of each raw event type's slug: its place in ``event_types``, or OTHER_SLUG_CODE."""
    # NOTE: at PostgreSQL's default READ COMMITTED level each query reads the rows committed
    # before it starts. A raw type first written after this query then gets no code, so its
    # events count in the totals and windows but in neither distinct_event_types nor a
    # per-type column.
    raw_type = _raw_event_type(events)
    with _reading_only(connection):
        raw_types = connection.execute(sa.select(raw_type).distinct()).scalars().all()
    codes = {slug: code for code, slug in enumerate(event_types)}
    records = [
        {"raw_type": raw, "slug_code": codes.get(slugify_event_type(raw), OTHER_SLUG_CODE)}
        for raw in raw_types
    ]
    if records:
        connection.execute(slug_table.insert(), records)


def _load_points(
    connection: Connection,
    point_table: sa.Table,
    positions: np.ndarray,
    lead_ids: pd.Series,
    feature_seconds: np.ndarray,
) -> None:
    """Replace the rows of the point table with the points at ``positions``."""
    batches = _point_rows(positions, lead_ids, feature_seconds)
    if connection.dialect.name == "postgresql":
        _copy_points(connection, point_table, batches)
        return
    connection.execute(point_table.delete())
    # For 100,000 points, the driver's executemany on tuples took 0.12 s and Core's insert
    # of dictionaries 0.5 s.
    insert = str(point_table.insert().compile(dialect=connection.dialect))
    for rows in batches:
        connection.exec_driver_sql(insert, rows)


def _point_rows(
    positions: np.ndarray, lead_ids: pd.Series, feature_seconds: np.ndarray
) -> Iterator[list[tuple]]:
    """Yield (position, lead_id, feature_seconds) rows in batches of TRANSFER_BATCH_ROWS.

    Lead ids become Python strings one batch at a time: converting a whole column of
    200,000 ids of pandas' str dtype at once took 12.6 MB.
    """
    for start in range(0, len(positions), TRANSFER_BATCH_ROWS):
        batch = positions[start : start + TRANSFER_BATCH_ROWS]
        rows = zip(batch.tolist(), lead_ids.iloc[batch].tolist(), feature_seconds[batch].tolist())
        yield list(rows)


def _copy_points(
    connection: Connection, point_table: sa.Table, batches: Iterator[list[tuple]]
) -> None:
    # create_engine_for runs PostgreSQL through psycopg 3, whose cursors can COPY.
    from psycopg import sql

    name = sql.Identifier(point_table.name)
    with connection.connection.dbapi_connection.cursor() as cursor:
        cursor.execute(sql.SQL("TRUNCATE {}").format(name))
        copy_statement = sql.SQL("COPY {} (position, lead_id, feature_seconds) FROM STDIN")
        with cursor.copy(copy_statement.format(name)) as copy:
            for rows in batches:
                for row in rows:
                    copy.write_row(row)
        # Without statistics on the new rows, PostgreSQL 15 guessed 75 million joined rows for
        # 100,000 points and chose a merge join, about twice as slow as the hash join it picks
        # after ANALYZE.
        cursor.execute(sql.SQL("ANALYZE {}").format(name))


def _activity_query(
    events: sa.FromClause,
    point_table: sa.Table,
    slug_table: sa.Table,
    type_count: int,
    cutoff: pd.Timestamp | None,
    dialect: str,
) -> sa.Select:
    """Build the query that summarises each point's events, one row per point with events.

    Columns: position, the activity features in ``activity_feature_columns`` order, then
    the minimum and maximum event age in seconds. Events are first counted per point and
    raw event type, so the slug codes are joined to those few rows and not to every event.
    """
    times = _event_times(events, point_table, dialect)
    age = times.c.feature_seconds - times.c.occurred_seconds
    before = [times.c.occurred_seconds < times.c.feature_seconds]
    if cutoff is not None:
        before.append(times.c.occurred_seconds < to_epoch_seconds(cutoff))
    window_counts = [
        sa.func.sum(sa.case((age <= days * SECONDS_PER_DAY, 1), else_=0)).label(f"events_{days}d")
        for days in ACTIVITY_WINDOWS_DAYS
    ]
    by_type = (
        sa.select(
            times.c.position,
            times.c.raw_type,
            *window_counts,
            sa.func.count().label("events_total"),
            sa.func.min(age).label("min_age_seconds"),
            sa.func.max(age).label("max_age_seconds"),
        )
        .where(*before)
        .group_by(times.c.position, times.c.raw_type)
        .subquery("events_by_type")
    )

    code = slug_table.c.slug_code
    counts = [sa.func.sum(by_type.c[f"events_{days}d"]) for days in ACTIVITY_WINDOWS_DAYS]
    counts += [sa.func.sum(by_type.c.events_total), sa.func.count(sa.distinct(code))]
    for slug_code in range(type_count):
        for column in (by_type.c.events_30d, by_type.c.events_total):
            counts.append(sa.func.sum(sa.case((code == slug_code, column), else_=0)))
    return (
        sa.select(
            by_type.c.position,
            *[sa.cast(count, sa.Float) for count in counts],
            sa.func.min(by_type.c.min_age_seconds),
            sa.func.max(by_type.c.max_age_seconds),
        )
        .select_from(by_type.outerjoin(slug_table, slug_table.c.raw_type == by_type.c.raw_type))
        .group_by(by_type.c.position)
    )


def _event_times(events: sa.FromClause, point_table: sa.Table, dialect: str) -> sa.Subquery:
    """Select each point's events: position, raw type, feature time and event time in seconds."""
    times = sa.select(
        point_table.c.position,
        _raw_event_type(events),
        point_table.c.feature_seconds,
        _occurred_seconds(events).label("occurred_seconds"),
    ).select_from(point_table.join(events, _lead_key(events) == point_table.c.lead_id))
    # Both databases would merge a plain subquery into the aggregate above it and then
    # convert the event time once for every use. SQLite keeps a subquery with a LIMIT
    # separate, and PostgreSQL one with an OFFSET, so each event is converted once.
    if dialect == "sqlite":
        times = times.limit(-1)
    elif dialect == "postgresql":
        times = times.offset(0)
    return times.subquery("event_times")


def _store_activity_rows(values: np.ndarray, rows: list) -> None:
    """Write query rows into ``values`` at their positions, with ages turned into days."""
    if not rows:
        return
    # Plain tuples, because numpy probes a Row for array attributes, which is slow.
    block = np.array([tuple(row) for row in rows], dtype="float64")
    positions = block[:, 0].astype(np.int64)
    block[:, -2:] /= SECONDS_PER_DAY
    values[positions] = block[:, 1:]


class FrameActivity:
    """Lead activity counted in pandas from lead events already in memory."""

    def __init__(self, events: pd.DataFrame):
        self.events = events

    def event_types(self) -> list[str]:
        """Return the event type slugs that get their own feature columns."""
        return select_event_types(self.events)

    def count(self, points: pd.DataFrame, event_types: list[str]) -> pd.DataFrame:
        """Return the activity features of each point (see ``activity_features``)."""
        return activity_features(self.events, points, event_types)


class WarehouseActivity:
    """Lead activity counted in the warehouse from the lead_events source, as of a cutoff.

    No event row reaches Python: the database returns one row per point. ``connection``
    must be able to create temporary tables.
    """

    def __init__(self, connection: Connection, settings: Settings, cutoff: pd.Timestamp):
        self.connection = connection
        self.settings = settings
        self.cutoff = cutoff

    def event_types(self) -> list[str]:
        """Return the event type slugs that get their own feature columns."""
        return select_event_types_in_warehouse(self.connection, self.settings, self.cutoff)

    def count(self, points: pd.DataFrame, event_types: list[str]) -> pd.DataFrame:
        """Return the activity features of each point (see ``activity_features_in_warehouse``)."""
        return activity_features_in_warehouse(
            self.connection, self.settings, points, event_types, self.cutoff
        )


def build_lead_features(
    leads: pd.DataFrame,
    events: pd.DataFrame | None,
    points: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    event_types: list[str] | None,
    activity: FrameActivity | WarehouseActivity | None = None,
) -> FeatureSet:
    """Build features for each (lead_id, feature_time) in ``points``.

    ``event_types`` None leaves activity out (the value model uses attributes only). Activity
    is counted by ``activity``, by default in pandas from ``events``.
    """
    points = points.reset_index(drop=True)
    attributes = lead_attributes(leads, numeric, categorical)
    created = leads[["lead_id", "created_at"]]
    frame = points.merge(created, on="lead_id", how="left", validate="many_to_one")
    frame = frame.merge(attributes, on="lead_id", how="left", validate="many_to_one")
    frame["lead_age_days"] = ((frame["feature_time"] - frame["created_at"]) / DAY).astype("float64")
    frame = frame.drop(columns="created_at")
    numeric_inputs = ["lead_age_days"] + numeric
    if event_types is not None:
        counter = activity if activity is not None else FrameActivity(events)
        counts = counter.count(points, event_types)
        frame = pd.concat([frame, counts], axis=1)
        numeric_inputs += list(counts.columns)
    return FeatureSet(frame=frame, numeric=numeric_inputs, categorical=list(categorical))


def snapshot_times(cutoff: pd.Timestamp, settings: Settings) -> list[pd.Timestamp]:
    """Return training snapshot times, newest first, each with a fully observed horizon."""
    horizon = pd.Timedelta(days=settings.horizon_days)
    step = pd.Timedelta(days=settings.model.snapshot_step_days)
    return [cutoff - horizon - k * step for k in range(settings.model.snapshot_count)]


def conversion_times(lead_ids: pd.Series, converted_at: pd.Series) -> pd.Series:
    """Return each lead's first won close time, NaT for a lead that never converted.

    Aligned with ``lead_ids``. Unlike ``Series.map``, this keeps the timestamp dtype when no
    lead has converted at all, which pandas 3 would otherwise try to cast to float.
    """
    times = converted_at.astype("datetime64[ns, UTC]").reindex(lead_ids.to_numpy())
    return pd.Series(times.array, index=lead_ids.index)


def open_leads_at(leads: pd.DataFrame, converted_at: pd.Series, moment: pd.Timestamp) -> pd.DataFrame:
    """Leads created before ``moment`` that had neither converted nor been disqualified by then."""
    conversion = conversion_times(leads["lead_id"], converted_at)
    is_open = (
        (leads["created_at"] < moment)
        & ~(leads["disqualified_at"] < moment)
        & ~(conversion < moment)
    )
    return leads.loc[is_open.fillna(False).astype(bool)]


def build_conversion_training_set(
    frames: SourceFrames,
    cutoff: pd.Timestamp,
    settings: Settings,
    activity: FrameActivity | WarehouseActivity | None = None,
) -> FeatureSet:
    """Open leads at each snapshot, with features at the snapshot and a within-horizon label.

    Activity is counted by ``activity``, by default in pandas from ``frames.lead_events``.
    """
    leads = frames.leads
    converted_at = first_conversions(frames.opportunities)
    horizon = pd.Timedelta(days=settings.horizon_days)
    max_age = pd.Timedelta(days=settings.model.max_lead_age_days)

    points = []
    for snapshot in snapshot_times(cutoff, settings):
        candidates = open_leads_at(leads, converted_at, snapshot)
        candidates = candidates.loc[snapshot - candidates["created_at"] <= max_age]
        if candidates.empty:
            continue
        conversion = conversion_times(candidates["lead_id"], converted_at)
        label = ((conversion >= snapshot) & (conversion < snapshot + horizon)).fillna(False)
        points.append(
            pd.DataFrame(
                {
                    "lead_id": candidates["lead_id"].to_numpy(),
                    "feature_time": snapshot,
                    "label": label.astype("int64").to_numpy(),
                }
            )
        )
    if not points:
        points_frame = pd.DataFrame(
            {"lead_id": pd.Series(dtype=object), "feature_time": pd.Series(dtype="datetime64[ns, UTC]"),
             "label": pd.Series(dtype="int64")}
        )
    else:
        points_frame = pd.concat(points, ignore_index=True)
    if len(points_frame) > settings.model.max_training_rows:
        # A uniform sample keeps the base rate, so calibration stays honest.
        points_frame = points_frame.sample(
            n=settings.model.max_training_rows, random_state=settings.model.random_seed
        ).sort_index()

    numeric, categorical = lead_attribute_columns(leads)
    counter = activity if activity is not None else FrameActivity(frames.lead_events)
    event_types = counter.event_types()
    features = build_lead_features(
        leads, None, points_frame[["lead_id", "feature_time"]], numeric, categorical, event_types, counter
    )
    features.frame["label"] = points_frame["label"].to_numpy()
    features.extra = {"event_types": event_types, "snapshots": len(points)}
    return features


def build_value_training_set(
    frames: SourceFrames, account_ltv: pd.DataFrame, settings: Settings
) -> FeatureSet:
    """Converted leads with the attributes known at conversion and their account's LTV."""
    opportunities = frames.opportunities
    won = opportunities.loc[
        opportunities["won"].fillna(False).astype(bool)
        & opportunities["closed_at"].notna()
        & opportunities["account_id"].notna()
    ].sort_values("closed_at")
    won = won.drop_duplicates("account_id", keep="first").drop_duplicates("lead_id", keep="first")
    ltv = pd.to_numeric(account_ltv["ltv"], errors="coerce")
    labelled = account_ltv.loc[ltv.notna() & (ltv > 0), ["account_id", "ltv"]]
    rows = won.merge(labelled, on="account_id", how="inner")
    rows = rows.loc[rows["lead_id"].isin(frames.leads["lead_id"])]

    numeric, categorical = lead_attribute_columns(frames.leads)
    points = pd.DataFrame(
        {
            "lead_id": rows["lead_id"].to_numpy(),
            "feature_time": pd.to_datetime(rows["closed_at"], utc=True).astype("datetime64[ns, UTC]").to_numpy(),
        }
    )
    points["feature_time"] = points["feature_time"].astype("datetime64[ns, UTC]")
    features = build_lead_features(frames.leads, frames.lead_events, points, numeric, categorical, None)
    # Lead age at conversion is not known for an open lead, so it is not a value input.
    features.frame = features.frame.drop(columns="lead_age_days")
    features.numeric = [name for name in features.numeric if name != "lead_age_days"]
    features.frame["ltv"] = rows["ltv"].to_numpy(dtype="float64")
    features.frame["account_id"] = rows["account_id"].to_numpy()
    return features


def build_scoring_features(
    frames: SourceFrames,
    cutoff: pd.Timestamp,
    event_types: list[str],
    activity: FrameActivity | WarehouseActivity | None = None,
) -> FeatureSet:
    """Features at the cutoff for every open lead: not converted and not disqualified."""
    chunks = list(iter_scoring_features(frames, cutoff, event_types, None, activity))
    if len(chunks) == 1:
        return chunks[0]
    frame = pd.concat([chunk.frame for chunk in chunks], ignore_index=True)
    return FeatureSet(frame=frame, numeric=chunks[0].numeric, categorical=chunks[0].categorical)


def iter_scoring_features(
    frames: SourceFrames,
    cutoff: pd.Timestamp,
    event_types: list[str],
    chunk_rows: int | None,
    activity: FrameActivity | WarehouseActivity | None = None,
) -> Iterator[FeatureSet]:
    """Yield the features of the open leads at the cutoff, ``chunk_rows`` leads at a time.

    Only one chunk's features exist at once, so memory stays bounded as the number of open
    leads grows. ``chunk_rows`` None gives one chunk. At least one chunk is yielded, empty
    when no lead is open, so that the caller still sees the feature columns.
    """
    converted_at = first_conversions(frames.opportunities)
    open_leads = open_leads_at(frames.leads, converted_at, cutoff)
    numeric, categorical = lead_attribute_columns(frames.leads)
    counter = activity if activity is not None else FrameActivity(frames.lead_events)
    size = chunk_rows or max(len(open_leads), 1)
    for start in range(0, max(len(open_leads), 1), size):
        leads = open_leads.iloc[start : start + size]
        points = pd.DataFrame({"lead_id": leads["lead_id"].to_numpy(), "feature_time": cutoff})
        points["feature_time"] = points["feature_time"].astype("datetime64[ns, UTC]")
        yield build_lead_features(leads, None, points, numeric, categorical, event_types, counter)


@task(name="build-training-sets", cache_policy=NO_CACHE)
@measured
def build_training_sets_task(
    frames: SourceFrames,
    account_ltv: pd.DataFrame,
    cutoff: pd.Timestamp,
    settings: Settings,
    warehouse: Warehouse | None = None,
) -> tuple[FeatureSet, FeatureSet]:
    """Build both training sets; with ``warehouse``, activity is counted there, not in pandas."""
    run_logger = get_run_logger()
    if warehouse is None:
        conversion = build_conversion_training_set(frames, cutoff, settings)
    else:
        with warehouse.engine.connect() as connection:
            activity = WarehouseActivity(connection, settings, cutoff)
            conversion = build_conversion_training_set(frames, cutoff, settings, activity)
            connection.rollback()
    value = build_value_training_set(frames, account_ltv, settings)
    positives = int(conversion.frame["label"].sum()) if len(conversion.frame) else 0
    run_logger.info(
        "Built training sets: conversion %d rows (%d converted within %d days) from %d snapshots; "
        "value %d converted accounts with an LTV label",
        len(conversion.frame), positives, settings.horizon_days,
        conversion.extra.get("snapshots", 0), len(value.frame),
    )
    return conversion, value
