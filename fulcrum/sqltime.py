"""Timestamp arithmetic that compiles to the same meaning on SQLite and PostgreSQL.

Source timestamps reach SQL in different shapes: ``timestamptz`` or ``timestamp`` columns on
PostgreSQL, ISO 8601 text on SQLite, and text from a SQL source mapping on either. The
expressions here turn any of them into seconds since the Unix epoch in UTC, so that
aggregations can compare and subtract times in the database. Naive values are taken as UTC,
as the data contract states; on PostgreSQL this relies on the session time zone being UTC,
which ``fulcrum.warehouse.create_engine_for`` sets.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

# Julian day number of 1970-01-01 00:00 UTC, for SQLite's julianday().
_UNIX_EPOCH_JULIAN_DAY = 2440587.5
_SECONDS_PER_DAY = 86400.0


class epoch_seconds(FunctionElement):
    """Seconds since 1970-01-01 UTC of a timestamp or ISO 8601 text, as a float; NULL stays NULL.

    On SQLite the value goes through ``julianday``, whose resolution is about 50 microseconds
    for present-day dates, so it is rounded to whole milliseconds there. Text that is not a
    timestamp gives NULL.
    """

    type = sa.Float()
    inherit_cache = True
    name = "epoch_seconds"


@compiles(epoch_seconds)
def _epoch_seconds_default(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    (argument,) = list(element.clauses)
    return f"EXTRACT(EPOCH FROM CAST({compiler.process(argument, **kw)} AS TIMESTAMP WITH TIME ZONE))"


@compiles(epoch_seconds, "sqlite")
def _epoch_seconds_sqlite(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    (argument,) = list(element.clauses)
    return (
        f"ROUND((julianday({compiler.process(argument, **kw)}) - {_UNIX_EPOCH_JULIAN_DAY}) "
        f"* {_SECONDS_PER_DAY}, 3)"
    )


def to_epoch_seconds(moment: pd.Timestamp | dt.datetime) -> float:
    """Return a timezone-aware moment as seconds since 1970-01-01 UTC, to bind into a query."""
    stamp = pd.Timestamp(moment)
    if stamp.tzinfo is None:
        raise ValueError(f"expected a timezone-aware timestamp. Got the naive timestamp {stamp}.")
    return (stamp - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
