"""Frames become their table's SQL types exactly: as CSV for COPY and as Python values."""

from __future__ import annotations

import datetime as dt
import uuid

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from psycopg import sql

from fulcrum.bulk import copy_rows, iter_csv_chunks, to_arrow_table, to_python_columns

UTC = dt.timezone.utc

EVENTS = sa.Table(
    "events",
    sa.MetaData(),
    sa.Column("name", sa.Text),
    sa.Column("score", sa.Float),
    sa.Column("rank", sa.Integer),
    sa.Column("active", sa.Boolean),
    sa.Column("day", sa.Date),
    sa.Column("seen_at", sa.DateTime(timezone=True)),
)


def event_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": ["a,b", 'q"x', "n\nl", "", None],
            "score": [0.1, np.nan, 1e300, -0.0, np.inf],
            "rank": [1.0, np.nan, 3.0, 4.0, 5.0],
            "active": [True, False, None, True, False],
            "day": [dt.date(2024, 4, 1)] * 5,
            "seen_at": pd.to_datetime(
                [
                    "2024-04-01 10:00:00.123456789+02:00",
                    None,
                    "2024-03-31 23:30:00-05:00",
                    "2024-04-01 00:00:00+00:00",
                    "2024-04-01 00:00:00+00:00",
                ],
                utc=True,
                format="mixed",
            ),
        }
    )


def test_csv_quotes_text_and_leaves_null_empty():
    rows = to_arrow_table(event_rows(), list(EVENTS.columns))

    chunks = [chunk.to_pybytes().decode() for chunk in iter_csv_chunks(rows, chunk_rows=2)]

    assert chunks == [
        '"a,b",0.1,1,true,2024-04-01,2024-04-01 08:00:00.123456Z\n'
        '"q""x",,,false,2024-04-01,\n',
        '"n\nl",1e+300,3,,2024-04-01,2024-04-01 04:30:00.000000Z\n'
        '"",-0,4,true,2024-04-01,2024-04-01 00:00:00.000000Z\n',
        ',inf,5,false,2024-04-01,2024-04-01 00:00:00.000000Z\n',
    ]


def test_python_columns_hold_none_and_utc():
    rows = to_arrow_table(event_rows(), list(EVENTS.columns))

    names, scores, ranks, active, days, seen = to_python_columns(rows)

    assert names == ["a,b", 'q"x', "n\nl", "", None]
    assert scores == [0.1, None, 1e300, 0.0, float("inf")]
    assert ranks == [1, None, 3, 4, 5]
    assert [type(rank) for rank in ranks if rank is not None] == [int] * 4
    assert active == [True, False, None, True, False]
    assert days == [dt.date(2024, 4, 1)] * 5
    assert seen == [
        dt.datetime(2024, 4, 1, 8, 0, 0, 123456, tzinfo=UTC),
        None,
        dt.datetime(2024, 4, 1, 4, 30, tzinfo=UTC),
        dt.datetime(2024, 4, 1, tzinfo=UTC),
        dt.datetime(2024, 4, 1, tzinfo=UTC),
    ]
    assert seen[0].utcoffset() == dt.timedelta(0)


def test_naive_and_local_timestamps_become_utc():
    naive = pd.DataFrame({"seen_at": pd.to_datetime(["2024-04-01 10:00:00", None])})
    local = pd.DataFrame(
        {"seen_at": pd.to_datetime(["2024-04-01 10:00:00"]).tz_localize("America/New_York")}
    )

    (naive_values,) = to_python_columns(to_arrow_table(naive, [EVENTS.c.seen_at]))
    (local_values,) = to_python_columns(to_arrow_table(local, [EVENTS.c.seen_at]))

    assert naive_values == [dt.datetime(2024, 4, 1, 10, tzinfo=UTC), None]
    # 10:00 in New York in April is daylight time, UTC-4.
    assert local_values == [dt.datetime(2024, 4, 1, 14, tzinfo=UTC)]


def test_nullable_integer_and_object_columns_convert():
    frame = pd.DataFrame(
        {
            "rank": pd.array([None, 2], dtype="Int64"),
            "name": pd.Series([pd.NA, "b"], dtype=object),
            "active": pd.Series([np.bool_(True), None], dtype=object),
        }
    )

    columns = to_python_columns(to_arrow_table(frame, [EVENTS.c.rank, EVENTS.c.name, EVENTS.c.active]))

    assert columns == [[None, 2], [None, "b"], [True, None]]


def test_fraction_in_integer_column_rejected():
    frame = pd.DataFrame({"rank": [1.0, 2.5, np.nan]})

    with pytest.raises(ValueError, match=r"column events\.rank \(float64 values such as \[1\.0, 2\.5\]\)") as raised:
        to_arrow_table(frame, [EVENTS.c.rank])

    assert "SQL type INTEGER" in str(raised.value)
    assert "2.5" in str(raised.value.__cause__)


def test_text_in_float_column_rejected():
    frame = pd.DataFrame({"score": ["0.5", "high"]})

    with pytest.raises(ValueError, match=r"column events\.score .*'high'.*SQL type FLOAT"):
        to_arrow_table(frame, [EVENTS.c.score])


def test_unsupported_sql_type_rejected():
    table = sa.Table("prices", sa.MetaData(), sa.Column("amount", sa.Numeric(10, 2)))

    with pytest.raises(TypeError, match=r"column prices\.amount has SQL type Numeric"):
        to_arrow_table(pd.DataFrame({"amount": [1.5]}), [table.c.amount])


@pytest.fixture
def postgres_engine(postgres_url):
    engine = sa.create_engine(postgres_url, connect_args={"options": "-c timezone=UTC"})
    yield engine
    engine.dispose()


@pytest.mark.postgres
def test_copy_round_trips_events(postgres_engine):
    name = f"events_{uuid.uuid4().hex[:8]}"
    table = EVENTS.to_metadata(sa.MetaData(), name=name)
    table.create(postgres_engine)
    try:
        with postgres_engine.begin() as connection:
            rows = to_arrow_table(event_rows(), list(table.columns))
            copy_rows(connection, sql.Identifier(name), rows)
        with postgres_engine.connect() as connection:
            stored = [tuple(row) for row in connection.execute(sa.select(table))]
    finally:
        table.drop(postgres_engine)

    assert stored == [
        ("a,b", 0.1, 1, True, dt.date(2024, 4, 1), dt.datetime(2024, 4, 1, 8, 0, 0, 123456, tzinfo=UTC)),
        ('q"x', None, None, False, dt.date(2024, 4, 1), None),
        ("n\nl", 1e300, 3, None, dt.date(2024, 4, 1), dt.datetime(2024, 4, 1, 4, 30, tzinfo=UTC)),
        ("", -0.0, 4, True, dt.date(2024, 4, 1), dt.datetime(2024, 4, 1, tzinfo=UTC)),
        (None, float("inf"), 5, False, dt.date(2024, 4, 1), dt.datetime(2024, 4, 1, tzinfo=UTC)),
    ]


@pytest.mark.postgres
def test_copy_error_raised_as_sqlalchemy_error(postgres_engine):
    name = f"events_{uuid.uuid4().hex[:8]}"
    table = sa.Table(name, sa.MetaData(), sa.Column("name", sa.Text, nullable=False))
    table.create(postgres_engine)
    try:
        with pytest.raises(sa.exc.IntegrityError, match='null value in column "name"'):
            with postgres_engine.begin() as connection:
                rows = to_arrow_table(pd.DataFrame({"name": ["a", None]}), list(table.columns))
                copy_rows(connection, sql.Identifier(name), rows)
    finally:
        table.drop(postgres_engine)
