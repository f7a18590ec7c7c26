"""Publish: replace the as-of partitions of the output tables, all of them or none.

Readers see either last night's rows or tonight's, never a mix, and a run that fails before
or during publishing leaves the previous partition in place. On PostgreSQL the rows go
through COPY into staging tables that are swapped in as the date's partitions
(tasks.publish_postgres). On SQLite and other databases the old rows are deleted and the
new ones inserted in one transaction. Every run, failed or not, leaves one audit row in
``score_runs``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator

import pandas as pd
import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection

from fulcrum.timing import measured
from fulcrum.bulk import to_arrow_table, to_python_columns
from fulcrum.warehouse import Warehouse
from tasks.publish_postgres import publish_by_partition_swap

logger = logging.getLogger(__name__)

INSERT_BATCH_ROWS = 20_000
MESSAGE_MAX_CHARS = 4000


def iter_records(
    frame: pd.DataFrame, columns: list[sa.Column], batch_rows: int
) -> Iterator[list[dict]]:
    """Yield batches of row dicts, each value converted to the Python type of its SQL column.

    NaN, NaT, None and NA become None, and timestamps become UTC datetimes. Arrow converts
    whole columns, so Python touches each value once, when it builds the row dicts.
    """
    rows = to_arrow_table(frame, columns)
    names = [column.name for column in columns]
    for start in range(0, rows.num_rows, batch_rows):
        values = to_python_columns(rows.slice(start, batch_rows))
        yield [dict(zip(names, row)) for row in zip(*values)]


def replace_partition(
    connection: Connection, table: sa.Table, as_of: dt.date, frame: pd.DataFrame
) -> int:
    """Delete the ``as_of`` rows of ``table`` and insert ``frame`` in their place."""
    connection.execute(sa.delete(table).where(table.c.as_of == as_of))
    if frame.empty:
        return 0
    frame = frame.assign(as_of=as_of)
    columns = [column for column in table.columns if column.name in frame.columns]
    written = 0
    for records in iter_records(frame, columns, INSERT_BATCH_ROWS):
        connection.execute(table.insert(), records)
        written += len(records)
    return written


def publish_scores(
    warehouse: Warehouse,
    as_of: dt.date,
    run_id: str,
    lead_scores: pd.DataFrame,
    account_ltv: pd.DataFrame,
    frontier: pd.DataFrame,
) -> dict[str, int]:
    """Replace the ``as_of`` partitions of the three score tables at once; return rows per table."""
    outputs = [
        (warehouse.outputs[name], frame.assign(run_id=run_id))
        for name, frame in (
            ("lead_scores", lead_scores),
            ("account_ltv", account_ltv),
            ("volume_value_frontier", frontier),
        )
    ]
    if warehouse.dialect == "postgresql":
        return publish_by_partition_swap(warehouse.engine, as_of, outputs)

    counts = {}
    with warehouse.engine.begin() as connection:
        for table, frame in outputs:
            counts[table.name] = replace_partition(connection, table, as_of, frame)
    return counts


@measured
def record_run_start(
    warehouse: Warehouse, run_id: str, flow_run_id: str | None, flow_name: str, as_of: dt.date
) -> None:
    """Insert the audit row of a run that has just started."""
    table = warehouse.outputs["score_runs"]
    with warehouse.engine.begin() as connection:
        connection.execute(sa.delete(table).where(table.c.run_id == run_id))
        connection.execute(
            table.insert().values(
                run_id=run_id,
                flow_run_id=flow_run_id,
                flow_name=flow_name,
                as_of=as_of,
                started_at=dt.datetime.now(dt.timezone.utc),
                status="running",
            )
        )


@measured
def record_run_end(warehouse: Warehouse, run_id: str, status: str, **fields) -> None:
    """Update the audit row with the outcome; dict values are stored as JSON text."""
    table = warehouse.outputs["score_runs"]
    values = {"status": status, "finished_at": dt.datetime.now(dt.timezone.utc)}
    for key, value in fields.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str, sort_keys=True)
        if key == "message" and value is not None:
            value = str(value)[:MESSAGE_MAX_CHARS]
        values[key] = value
    with warehouse.engine.begin() as connection:
        connection.execute(sa.update(table).where(table.c.run_id == run_id).values(**values))


def latest_successful_run(warehouse: Warehouse, as_of: dt.date) -> dict | None:
    """Return the newest succeeded audit row for ``as_of``, or None."""
    table = warehouse.outputs["score_runs"]
    query = (
        sa.select(table)
        .where(table.c.as_of == as_of, table.c.status == "succeeded")
        .order_by(table.c.finished_at.desc())
        .limit(1)
    )
    with warehouse.engine.connect() as connection:
        row = connection.execute(query).mappings().first()
    return dict(row) if row else None


def previous_successful_run(warehouse: Warehouse, as_of: dt.date) -> dict | None:
    """Return the newest succeeded audit row for a date before ``as_of``, or None."""
    table = warehouse.outputs["score_runs"]
    query = (
        sa.select(table)
        .where(table.c.as_of < as_of, table.c.status == "succeeded")
        .order_by(table.c.as_of.desc(), table.c.finished_at.desc())
        .limit(1)
    )
    with warehouse.engine.connect() as connection:
        row = connection.execute(query).mappings().first()
    return dict(row) if row else None


@task(name="publish-scores", retries=2, retry_delay_seconds=[10, 30], cache_policy=NO_CACHE)
@measured
def publish_scores_task(
    warehouse: Warehouse,
    as_of: dt.date,
    run_id: str,
    lead_scores: pd.DataFrame,
    account_ltv: pd.DataFrame,
    frontier: pd.DataFrame,
) -> dict[str, int]:
    run_logger = get_run_logger()
    counts = publish_scores(warehouse, as_of, run_id, lead_scores, account_ltv, frontier)
    run_logger.info(
        "Published as of %s: %s",
        as_of,
        ", ".join(f"{name} {count:,} rows" for name, count in counts.items()),
    )
    return counts
