"""Publish: replace the as-of partitions of the output tables in one transaction.

Readers see either last night's rows or tonight's, never a mix: the delete of the old
partition and the insert of the new one commit together. A run that fails before or
during publishing leaves the previous partition in place. Every run, failed or not,
leaves one audit row in ``score_runs``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection

from fulcrum.warehouse import Warehouse

logger = logging.getLogger(__name__)

INSERT_BATCH_ROWS = 20_000
MESSAGE_MAX_CHARS = 4000


def iter_records(frame: pd.DataFrame, columns: list[str], batch_rows: int) -> Iterator[list[dict]]:
    """Yield batches of row dicts with NaN, NaT and NA turned into None."""
    for start in range(0, len(frame), batch_rows):
        part = frame.iloc[start : start + batch_rows][columns]
        values = part.astype(object).where(part.notna(), None)
        records = values.to_dict("records")
        for record in records:
            for key, value in record.items():
                if isinstance(value, np.generic):
                    record[key] = value.item()
                elif isinstance(value, pd.Timestamp):
                    record[key] = value.to_pydatetime()
        yield records


def replace_partition(
    connection: Connection, table: sa.Table, as_of: dt.date, frame: pd.DataFrame
) -> int:
    """Delete the ``as_of`` rows of ``table`` and insert ``frame`` in their place."""
    connection.execute(sa.delete(table).where(table.c.as_of == as_of))
    if frame.empty:
        return 0
    frame = frame.assign(as_of=as_of)
    columns = [column.name for column in table.columns if column.name in frame.columns]
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
    """Replace the ``as_of`` partitions of the three score tables in one transaction."""
    outputs = warehouse.outputs
    counts = {}
    with warehouse.engine.begin() as connection:
        for name, frame in (
            ("lead_scores", lead_scores),
            ("account_ltv", account_ltv),
            ("volume_value_frontier", frontier),
        ):
            counts[name] = replace_partition(connection, outputs[name], as_of, frame.assign(run_id=run_id))
    return counts


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
