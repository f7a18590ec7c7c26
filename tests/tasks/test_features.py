"""Lead features are point in time, and training sets are labelled within the horizon."""

from __future__ import annotations

import datetime as dt
import uuid

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.contract import define_source_tables
from fulcrum.simulate import simulate_company
from fulcrum.warehouse import create_engine_for, read_only_connection
from tasks.extract import SourceFrames, as_of_cutoff, extract_sources
from tasks.features import (
    activity_features,
    activity_features_in_warehouse,
    build_conversion_training_set,
    build_scoring_features,
    build_value_training_set,
    event_type_counts_in_warehouse,
    event_types_from_columns,
    feature_time_seconds,
    lead_attribute_columns,
    select_event_types,
    select_event_types_in_warehouse,
    slugify_event_type,
)
from tests.helpers.sources import tiny_sources, ts


def frames_from(sources: dict[str, pd.DataFrame]) -> SourceFrames:
    sources = {name: frame.copy() for name, frame in sources.items()}
    for frame in sources.values():
        for column in frame.columns:
            if column.endswith("_at") or column.startswith("period_"):
                frame[column] = pd.to_datetime(frame[column], utc=True)
    sources["opportunities"]["won"] = sources["opportunities"]["won"].astype("boolean")
    return SourceFrames(**sources)


def test_activity_counts_by_window_and_type():
    frames = frames_from(tiny_sources())
    points = pd.DataFrame({"lead_id": ["L1"], "feature_time": [ts("2024-02-01")]})

    activity = activity_features(frames.lead_events, points, ["demo_request", "page_view"])

    row = activity.iloc[0]
    assert row["events_7d"] == 0
    assert row["events_30d"] == 2
    assert row["events_total"] == 2
    assert row["distinct_event_types"] == 2
    assert row["days_since_last_event"] == 12
    assert row["days_since_first_event"] == 26
    assert row["evt_page_view_30d"] == 1
    assert row["evt_demo_request_total"] == 1


def test_activity_of_lead_without_events():
    frames = frames_from(tiny_sources())
    points = pd.DataFrame({"lead_id": ["L2"], "feature_time": [ts("2024-02-10 12:00")]})

    activity = activity_features(frames.lead_events, points, ["page_view"])

    assert activity.loc[0, "events_total"] == 0
    assert pd.isna(activity.loc[0, "days_since_last_event"])


def test_events_after_feature_time_change_no_feature():
    frames = frames_from(tiny_sources())
    cutoff = ts("2024-04-01")
    before = build_scoring_features(frames, cutoff, ["page_view", "pricing_page_view"]).frame
    later_events = pd.DataFrame(
        {
            "lead_id": ["L2", "L3", "L3"],
            "event_type": ["page_view", "pricing_page_view", "trial_start"],
            "occurred_at": [cutoff, cutoff + pd.Timedelta(hours=1), ts("2024-06-01")],
        }
    )
    frames.lead_events = pd.concat([frames.lead_events, later_events], ignore_index=True)

    after = build_scoring_features(frames, cutoff, ["page_view", "pricing_page_view"]).frame

    pd.testing.assert_frame_equal(before, after)


def test_scoring_features_cover_open_leads_only():
    frames = frames_from(tiny_sources())

    features = build_scoring_features(frames, ts("2024-04-01"), ["page_view"])

    assert features.frame["lead_id"].tolist() == ["L2", "L3"]
    # L2: 2024-02-10 09:30 to 2024-04-01 00:00 is 50 days and 14.5 hours (2024 is a leap year).
    assert features.frame["lead_age_days"].tolist() == pytest.approx([50 + 14.5 / 24, 1 / (24 * 60)])


def test_disqualified_lead_is_not_open():
    sources = tiny_sources()
    sources["leads"].loc[2, "disqualified_at"] = ts("2024-03-31 23:59:30")
    frames = frames_from(sources)

    features = build_scoring_features(frames, ts("2024-04-01"), [])

    assert features.frame["lead_id"].tolist() == ["L2"]


def test_conversion_training_rows_and_labels(settings_factory):
    settings = settings_factory(horizon_days=30, model={"snapshot_count": 2, "snapshot_step_days": 30})
    frames = frames_from(tiny_sources())

    training = build_conversion_training_set(frames, ts("2024-04-01"), settings)

    rows = training.frame[["lead_id", "feature_time", "label"]].sort_values("feature_time")
    assert rows["lead_id"].tolist() == ["L1", "L2"]
    assert rows["feature_time"].tolist() == [ts("2024-02-01"), ts("2024-03-02")]
    assert rows["label"].tolist() == [1, 0]


def test_conversion_training_ignores_leads_older_than_max_age(settings_factory):
    settings = settings_factory(
        horizon_days=30, model={"snapshot_count": 1, "snapshot_step_days": 30, "max_lead_age_days": 10}
    )
    frames = frames_from(tiny_sources())

    training = build_conversion_training_set(frames, ts("2024-04-01"), settings)

    assert training.frame.empty


def test_value_training_set_uses_attributes_at_conversion(settings_factory):
    settings = settings_factory()
    frames = frames_from(tiny_sources())
    account_ltv = pd.DataFrame({"account_id": ["A1"], "ltv": [1234.0]})

    value = build_value_training_set(frames, account_ltv, settings)

    assert value.frame["lead_id"].tolist() == ["L1"]
    assert value.frame["ltv"].tolist() == [1234.0]
    assert value.frame["feature_time"].tolist() == [ts("2024-02-01")]
    assert "lead_age_days" not in value.input_columns
    assert not any(name.startswith("events_") for name in value.input_columns)


def test_attribute_columns_include_extra_lead_columns():
    leads = tiny_sources()["leads"].assign(country=["DE", "US", "US"], seats_requested=[5, 10, None])

    numeric, categorical = lead_attribute_columns(leads)

    assert numeric == ["employees", "seats_requested"]
    assert categorical == ["channel", "industry", "region", "seniority", "country"]


def test_event_types_round_trip_through_column_names():
    frames = frames_from(tiny_sources())
    event_types = select_event_types(frames.lead_events)
    columns = build_scoring_features(frames, ts("2024-04-01"), event_types).input_columns

    assert event_types == ["demo_request", "page_view", "pricing_page_view"]
    assert event_types_from_columns(columns) == event_types


# Activity counted in the warehouse must equal the pandas reference above.

SIMULATION_END = dt.date(2024, 7, 1)
FEATURE_TIME = ts("2024-03-01")
DAY_COLUMNS = ["days_since_last_event", "days_since_first_event"]
SOURCE_NAMES = ["leads", "lead_events", "opportunities", "billing_accounts", "invoices"]
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def assert_activity_equal(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Check counts exactly and ages within a relative 1e-9, since SQLite keeps milliseconds."""
    counts = [name for name in expected.columns if name not in DAY_COLUMNS]
    assert actual.columns.tolist() == expected.columns.tolist()
    pd.testing.assert_frame_equal(actual[counts], expected[counts], check_exact=True)
    pd.testing.assert_frame_equal(
        actual[DAY_COLUMNS], expected[DAY_COLUMNS], check_exact=False, rtol=1e-9, atol=0
    )


def new_schema_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def drop_schema(url: str, schema: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(scope="module")
def simulated_sqlite(tmp_path_factory) -> tuple[str, None]:
    url = f"sqlite:///{tmp_path_factory.mktemp('features') / 'warehouse.db'}"
    simulate_company(url, leads=3_000, months=12, seed=7, end=SIMULATION_END)
    return url, None


@pytest.fixture(scope="module")
def simulated_postgresql(postgres_url):
    schema = new_schema_name("features")
    simulate_company(postgres_url, leads=3_000, months=12, seed=7, end=SIMULATION_END, schema=schema)
    try:
        yield postgres_url, schema
    finally:
        drop_schema(postgres_url, schema)


@pytest.fixture(params=BACKENDS)
def simulated(request, settings_factory):
    """Settings for a simulated 3,000-lead company, chunked by 1,000 points, and its frames."""
    url, schema = request.getfixturevalue(f"simulated_{request.param}")
    sources = {name: {"table": name, "schema": schema} for name in SOURCE_NAMES}
    settings = settings_factory(warehouse_url=url, sources=sources, chunk_rows=1_000)
    frames = extract_sources(settings, SIMULATION_END)
    engine = create_engine_for(url)
    yield settings, frames, engine
    engine.dispose()


def test_warehouse_event_counts_match_pandas(simulated):
    settings, frames, engine = simulated
    cutoff = as_of_cutoff(SIMULATION_END, "UTC")
    expected = frames.lead_events["event_type"].map(slugify_event_type).value_counts()

    with engine.connect() as connection:
        counts = event_type_counts_in_warehouse(connection, settings, cutoff)
        chosen = select_event_types_in_warehouse(connection, settings, cutoff)

    assert counts.to_dict() == expected.to_dict()
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)
    assert chosen == select_event_types(frames.lead_events)


def test_warehouse_scoring_activity_matches_pandas(simulated):
    settings, frames, engine = simulated
    cutoff = as_of_cutoff(SIMULATION_END, "UTC")
    event_types = select_event_types(frames.lead_events)
    points = build_scoring_features(frames, cutoff, event_types).frame[["lead_id", "feature_time"]]
    expected = activity_features(frames.lead_events, points, event_types)

    with engine.connect() as connection:
        actual = activity_features_in_warehouse(connection, settings, points, event_types, cutoff)

    assert len(points) > settings.chunk_rows
    assert (expected["events_total"] > 0).sum() > 100
    assert (expected[[f"evt_{slug}_total" for slug in event_types]].sum() > 0).all()
    assert_activity_equal(actual, expected)


def test_warehouse_training_activity_matches_pandas(simulated):
    settings, frames, engine = simulated
    cutoff = as_of_cutoff(SIMULATION_END, "UTC")
    # Four of the seven simulated types, so that the other three count as '__other__'.
    event_types = select_event_types(frames.lead_events)[:4]
    training = build_conversion_training_set(frames, cutoff, settings).frame
    # Shuffled, so that the result must follow the order and index of the points.
    points = training[["lead_id", "feature_time"]].sample(frac=1, random_state=3)
    expected = activity_features(frames.lead_events, points, event_types)

    with engine.connect() as connection:
        actual = activity_features_in_warehouse(connection, settings, points, event_types, cutoff)

    assert points["feature_time"].nunique() == settings.model.snapshot_count
    assert actual.index.tolist() == points.index.tolist()
    assert (expected["events_total"] > 0).sum() > 100
    chosen_types_seen = expected[[f"evt_{slug}_total" for slug in event_types]].gt(0).sum(axis=1)
    # Events of the other types add '__other__' to the distinct count of some points.
    assert (expected["distinct_event_types"] > chosen_types_seen).any()
    assert_activity_equal(actual, expected)


# Raw types that share a slug, a type outside the chosen list, an event exactly at the
# feature time, one exactly 7 days before it and one a second older than 7 days.
HAND_EVENTS = [
    ("L1", "Page View", FEATURE_TIME - pd.Timedelta(days=1)),
    ("L1", "page_view", FEATURE_TIME - pd.Timedelta(days=7)),
    ("L1", "page-view!", FEATURE_TIME - pd.Timedelta(days=10)),
    ("L1", "Webinar", FEATURE_TIME - pd.Timedelta(days=40)),
    ("L1", "demo request", FEATURE_TIME),
    ("L1", "DEMO_REQUEST", FEATURE_TIME - pd.Timedelta(days=100)),
    ("L1", "page_view", FEATURE_TIME + pd.Timedelta(hours=1)),
    ("L3", "webinar", FEATURE_TIME - pd.Timedelta(days=7, seconds=1)),
]
HAND_EVENT_TYPES = ["demo_request", "page_view"]
HAND_COLUMNS = [
    "events_7d", "events_30d", "events_90d", "events_total", "distinct_event_types",
    "evt_demo_request_30d", "evt_demo_request_total", "evt_page_view_30d", "evt_page_view_total",
    *DAY_COLUMNS,
]
SEVEN_DAYS_AND_A_SECOND = (7 * 86_400 + 1) / 86_400


def hand_points() -> pd.DataFrame:
    """Four points in no particular order, under an index that is not 0..n-1."""
    return pd.DataFrame(
        {
            "lead_id": ["L3", "L1", "L2", "L1"],
            "feature_time": [FEATURE_TIME, FEATURE_TIME, FEATURE_TIME, FEATURE_TIME - pd.Timedelta(days=5)],
        },
        index=[10, 11, 12, 13],
    )


def hand_expected(rows: list[list[float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, index=[10, 11, 12, 13], columns=HAND_COLUMNS, dtype="float64")


L1_AT_FEATURE_TIME = [2, 3, 4, 5, 3, 0, 1, 3, 3, 1.0, 100.0]
L2_WITHOUT_EVENTS = [0, 0, 0, 0, 0, 0, 0, 0, 0, np.nan, np.nan]
L3_AT_FEATURE_TIME = [0, 1, 1, 1, 1, 0, 0, 0, 0, SEVEN_DAYS_AND_A_SECOND, SEVEN_DAYS_AND_A_SECOND]
# Five days earlier, L1 had the page views of 7 and 10 days before FEATURE_TIME, the webinar
# and the demo request.
L1_FIVE_DAYS_EARLIER = [2, 2, 3, 4, 3, 0, 1, 2, 2, 2.0, 95.0]


@pytest.fixture(params=BACKENDS)
def hand_warehouse(request, tmp_path):
    """A lead_events table containing HAND_EVENTS: (engine, schema or None, qualified table name)."""
    if request.param == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'hand.db'}", None
    else:
        url, schema = request.getfixturevalue("postgres_url"), new_schema_name("hand")
    engine = create_engine_for(url)
    if schema is not None:
        with engine.begin() as connection:
            connection.execute(sa.schema.CreateSchema(schema))
    events = define_source_tables(sa.MetaData(), schema=schema)["lead_events"]
    events.create(engine)
    with engine.begin() as connection:
        connection.execute(
            events.insert(),
            [
                {"lead_id": lead_id, "event_type": event_type, "occurred_at": moment.to_pydatetime()}
                for lead_id, event_type, moment in HAND_EVENTS
            ],
        )
    qualified = f"{schema}.lead_events" if schema else "lead_events"
    try:
        yield engine, schema, qualified
    finally:
        engine.dispose()
        if schema is not None:
            drop_schema(url, schema)


def hand_settings(settings_factory, hand_warehouse, **lead_events):
    engine, schema, _ = hand_warehouse
    spec = lead_events or {"table": "lead_events", "schema": schema}
    url = engine.url.render_as_string(hide_password=False)
    return settings_factory(warehouse_url=url, sources={"lead_events": spec})


def temporary_table_names(connection: sa.Connection) -> list[str]:
    if connection.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_temp_master WHERE type = 'table'"
    else:
        query = "SELECT relname FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'"
    return sorted(connection.exec_driver_sql(query).scalars())


def test_warehouse_activity_hand_made_events(settings_factory, hand_warehouse):
    settings = hand_settings(settings_factory, hand_warehouse)
    engine, _, _ = hand_warehouse

    with engine.connect() as connection:
        actual = activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)

    expected = hand_expected([L3_AT_FEATURE_TIME, L1_AT_FEATURE_TIME, L2_WITHOUT_EVENTS, L1_FIVE_DAYS_EARLIER])
    assert_activity_equal(actual, expected)


def test_pandas_activity_hand_made_events():
    events = pd.DataFrame(HAND_EVENTS, columns=["lead_id", "event_type", "occurred_at"])

    reference = activity_features(events, hand_points(), HAND_EVENT_TYPES)

    expected = hand_expected([L3_AT_FEATURE_TIME, L1_AT_FEATURE_TIME, L2_WITHOUT_EVENTS, L1_FIVE_DAYS_EARLIER])
    assert_activity_equal(reference, expected)


def test_warehouse_activity_ignores_later_events(settings_factory, hand_warehouse):
    settings = hand_settings(settings_factory, hand_warehouse)
    engine, _, _ = hand_warehouse
    points = hand_points().loc[[11]]

    with engine.connect() as connection:
        actual = activity_features_in_warehouse(
            connection, settings, points, HAND_EVENT_TYPES, cutoff=FEATURE_TIME - pd.Timedelta(days=2)
        )

    # The page view of one day before FEATURE_TIME occurred after the cutoff.
    expected = pd.DataFrame(
        [[1, 2, 3, 4, 3, 0, 1, 2, 2, 7.0, 100.0]], index=[11], columns=HAND_COLUMNS, dtype="float64"
    )
    assert_activity_equal(actual, expected)


def test_warehouse_activity_reads_sql_mapping(settings_factory, hand_warehouse):
    _, _, qualified = hand_warehouse
    mapping = (
        f"SELECT lead_id, event_type, CAST(occurred_at AS TEXT) AS occurred_at "
        f"FROM {qualified} WHERE lead_id <> 'L3'"
    )
    settings = hand_settings(settings_factory, hand_warehouse, sql=mapping)
    engine, _, _ = hand_warehouse

    with engine.connect() as connection:
        actual = activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)

    expected = hand_expected([L2_WITHOUT_EVENTS, L1_AT_FEATURE_TIME, L2_WITHOUT_EVENTS, L1_FIVE_DAYS_EARLIER])
    assert_activity_equal(actual, expected)


def test_warehouse_activity_drops_temporary_tables(settings_factory, hand_warehouse):
    settings = hand_settings(settings_factory, hand_warehouse)
    engine, _, _ = hand_warehouse

    with engine.connect() as connection:
        first = activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)
        second = activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)
        after_calls = temporary_table_names(connection)
        connection.rollback()
        after_rollback = temporary_table_names(connection)

    pd.testing.assert_frame_equal(first, second)
    assert after_calls == []
    assert after_rollback == []


@pytest.mark.postgres
@pytest.mark.parametrize("hand_warehouse", ["postgresql"], indirect=True)
def test_failed_activity_query_drops_temporary_tables(settings_factory, hand_warehouse):
    _, _, qualified = hand_warehouse
    mapping = f"SELECT lead_id, event_type, 'not a time' AS occurred_at FROM {qualified}"
    settings = hand_settings(settings_factory, hand_warehouse, sql=mapping)
    engine, _, _ = hand_warehouse

    with engine.connect() as connection:
        with pytest.raises(sa.exc.DataError, match="invalid input syntax for type timestamp"):
            activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)
        left = temporary_table_names(connection)

    assert left == []


@pytest.mark.postgres
@pytest.mark.parametrize("hand_warehouse", ["postgresql"], indirect=True)
def test_sql_mapping_runs_read_only(settings_factory, hand_warehouse):
    engine, schema, qualified = hand_warehouse
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE SEQUENCE {schema}.draws")
    mapping = f"SELECT lead_id, event_type, occurred_at, nextval('{schema}.draws') AS draw FROM {qualified}"
    settings = hand_settings(settings_factory, hand_warehouse, sql=mapping)

    with engine.connect() as connection:
        with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
            activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)
        connection.rollback()
        drawn = connection.exec_driver_sql(f"SELECT is_called FROM {schema}.draws").scalar_one()

    assert drawn is False


@pytest.mark.parametrize(
    ("cutoff", "expected"),
    [
        (FEATURE_TIME, [("page_view", 3), ("webinar", 2), ("demo_request", 1)]),
        # A day later the demo request at FEATURE_TIME ties with the webinars, and the slug
        # order breaks the tie.
        (FEATURE_TIME + pd.Timedelta(days=1), [("page_view", 4), ("demo_request", 2), ("webinar", 2)]),
    ],
)
def test_warehouse_event_counts_merge_slugs(settings_factory, hand_warehouse, cutoff, expected):
    settings = hand_settings(settings_factory, hand_warehouse)
    engine, _, _ = hand_warehouse

    with engine.connect() as connection:
        counts = event_type_counts_in_warehouse(connection, settings, cutoff)

    assert list(counts.items()) == expected
    assert counts.dtype == "int64"


def test_warehouse_event_counts_keep_connection_read_only(settings_factory, hand_warehouse):
    settings = hand_settings(settings_factory, hand_warehouse)
    engine, _, _ = hand_warehouse

    with read_only_connection(engine) as connection:
        counts = event_type_counts_in_warehouse(connection, settings, FEATURE_TIME)
        if connection.dialect.name == "sqlite":
            read_only = connection.exec_driver_sql("PRAGMA query_only").scalar_one() == 1
        else:
            read_only = connection.exec_driver_sql("SHOW transaction_read_only").scalar_one() == "on"

    assert counts.sum() == 6
    assert read_only


def test_warehouse_activity_without_events_source(settings_factory):
    settings = settings_factory(sources={"lead_events": {"absent": True}})
    engine = create_engine_for(settings.warehouse_url.get_secret_value())

    with engine.connect() as connection:
        actual = activity_features_in_warehouse(connection, settings, hand_points(), HAND_EVENT_TYPES)
        counts = event_type_counts_in_warehouse(connection, settings, FEATURE_TIME)
    engine.dispose()

    assert_activity_equal(actual, hand_expected([L2_WITHOUT_EVENTS] * 4))
    assert counts.empty


def test_feature_times_must_be_timezone_aware():
    points = pd.DataFrame({"lead_id": ["L1"], "feature_time": [pd.Timestamp("2024-03-01")]})

    with pytest.raises(ValueError, match="points.feature_time must hold timezone-aware timestamps"):
        feature_time_seconds(points)


def test_feature_time_seconds_keep_missing_times():
    points = pd.DataFrame({"lead_id": ["L1", "L2"], "feature_time": [FEATURE_TIME, pd.NaT]})
    points["feature_time"] = points["feature_time"].astype("datetime64[ns, UTC]")

    seconds = feature_time_seconds(points)

    assert seconds[0] == 1_709_251_200.0
    assert np.isnan(seconds[1])
