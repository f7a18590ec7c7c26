"""Publish on PostgreSQL: COPY each table into a staging table, then swap in the date's partition.

The per-date output tables are partitioned by ``LIST (as_of)`` (see
``fulcrum.contract.define_output_tables``). Publishing runs two transactions on one
connection:

1. Stage: for each output table, create a standalone staging table shaped like it, with a
   ``CHECK (as_of = <date>)`` constraint, fill it with COPY and build its primary key.
2. Swap: for each output table, detach and drop the date's old partition, if any, then rename
   the staging table to ``<table>_<yyyymmdd>`` and attach it as the date's partition. The
   CHECK constraint lets ATTACH skip scanning the rows.

Readers see the old partitions or the new ones, never a mix, because the swap commits all
three tables together. Detaching an old partition takes an ACCESS EXCLUSIVE lock on its
table, so a reader waits for that short transaction, and the swap waits for readers that
started before it. A table created unpartitioned by an earlier version gets a staging table
too, and its swap deletes the date's rows and inserts the staged ones instead.

NOTE: a REPEATABLE READ or SERIALIZABLE transaction whose snapshot predates the swap, but
which first reads a score table after it, reads the new rows. Attaching and dropping
partitions does not follow MVCC, and COPY FREEZE makes the staged rows visible to every
snapshot. With the DELETE and INSERT of an unpartitioned table it reads the old rows.

When staging or the swap fails, the staging tables are dropped and the previous partitions
stay. A process killed between the two transactions cannot drop its staging tables, so each
one carries a comment naming the server process that made it, and the next publish into the
schema drops those whose server process has ended.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fulcrum.bulk import copy_rows, to_arrow_table
from fulcrum.contract import PARTITION_BY_AS_OF

logger = logging.getLogger(__name__)

STAGING_COMMENT_PREFIX = "fulcrum staging table"
_STAGING_COMMENT = re.compile(
    rf"^{STAGING_COMMENT_PREFIX} of server process (\d+) started at (-?\d+) us since 1970$"
)

# Output tables already reported as unpartitioned by this process, as "schema.table".
_reported_unpartitioned: set[str] = set()


@dataclass(frozen=True)
class StagedTable:
    """A filled staging table and the output table whose ``as_of`` rows it replaces."""

    table: sa.Table
    schema: str
    name: str
    columns: tuple[str, ...]
    partitioned: bool
    rows: int


def publish_by_partition_swap(
    engine: Engine, as_of: dt.date, outputs: list[tuple[sa.Table, pd.DataFrame]]
) -> dict[str, int]:
    """Replace the ``as_of`` rows of each output table with its frame; return rows per table.

    Either every table gets its new rows or none does.
    """
    _check_date(as_of)
    if engine.driver != "psycopg":
        raise RuntimeError(
            f"publishing to PostgreSQL uses COPY through psycopg 3, but the warehouse URL names "
            f"the driver {engine.driver!r}. Write the URL as postgresql+psycopg://..."
        )
    staged: list[StagedTable] = []
    with engine.connect() as connection:
        with connection.begin():
            schema = _resolve_schema(connection, outputs[0][0].schema)
            drop_abandoned_staging_tables(connection, schema)
        try:
            with connection.begin():
                for table, frame in outputs:
                    staged.append(stage_partition(connection, schema, table, as_of, frame))
            with connection.begin():
                for staged_table in staged:
                    swap_partition(connection, staged_table, as_of)
        except BaseException:
            drop_staging_tables(engine, staged)
            raise
    return {staged_table.table.name: staged_table.rows for staged_table in staged}


def stage_partition(
    connection: Connection, schema: str, table: sa.Table, as_of: dt.date, frame: pd.DataFrame
) -> StagedTable:
    """Create a staging table shaped like ``table`` and COPY ``frame`` into it as the ``as_of`` rows."""
    partitioned = is_partitioned_by_as_of(connection, schema, table.name)
    if not partitioned:
        _report_unpartitioned(schema, table.name)
    name = f"{table.name}_staging_{uuid.uuid4().hex[:12]}"
    staging = sql.Identifier(schema, name)
    execute(
        connection,
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
            staging, sql.Identifier(schema, table.name)
        ),
    )
    execute(
        connection,
        sql.SQL("COMMENT ON TABLE {} IS {}").format(staging, sql.Literal(_staging_comment(connection))),
    )
    if partitioned:
        execute(
            connection,
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} = {})").format(
                staging, sql.Identifier(f"{name}_as_of"), sql.Identifier("as_of"), sql.Literal(as_of)
            ),
        )

    frame = frame.assign(as_of=as_of)
    columns = [column for column in table.columns if column.name in frame.columns]
    copy_rows(connection, staging, to_arrow_table(frame, columns), freeze=True)

    if partitioned:
        # The index is built once over all rows, which is faster than updating it per row.
        key = sql.SQL(", ").join(sql.Identifier(column.name) for column in table.primary_key)
        execute(
            connection,
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})").format(
                staging, sql.Identifier(f"{name}_pkey"), key
            ),
        )
    return StagedTable(
        table=table,
        schema=schema,
        name=name,
        columns=tuple(column.name for column in columns),
        partitioned=partitioned,
        rows=len(frame),
    )


def swap_partition(connection: Connection, staged: StagedTable, as_of: dt.date) -> None:
    """Make the staging table the ``as_of`` rows of its output table, in the open transaction."""
    if not staged.partitioned:
        replace_rows_from_staging(connection, staged, as_of)
        return

    parent = sql.Identifier(staged.schema, staged.table.name)
    staging = sql.Identifier(staged.schema, staged.name)
    old = find_partition(connection, staged.schema, staged.table.name, as_of)
    if old is not None:
        old_partition = sql.Identifier(*old)
        execute(connection, sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, old_partition))
        execute(connection, sql.SQL("DROP TABLE {}").format(old_partition))

    name = partition_name(staged.table.name, as_of)
    partition = sql.Identifier(staged.schema, name)
    execute(connection, sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, sql.Identifier(name)))
    execute(
        connection,
        sql.SQL("ALTER INDEX {} RENAME TO {}").format(
            sql.Identifier(staged.schema, f"{staged.name}_pkey"), sql.Identifier(f"{name}_pkey")
        ),
    )
    execute(
        connection,
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
            parent, partition, sql.Literal(as_of)
        ),
    )
    # The partition bound now enforces what the CHECK constraint did.
    execute(
        connection,
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            partition, sql.Identifier(f"{staged.name}_as_of")
        ),
    )
    execute(connection, sql.SQL("COMMENT ON TABLE {} IS NULL").format(partition))


def replace_rows_from_staging(connection: Connection, staged: StagedTable, as_of: dt.date) -> None:
    """Delete the ``as_of`` rows of an unpartitioned table, insert the staged rows and drop the staging table."""
    parent = sql.Identifier(staged.schema, staged.table.name)
    staging = sql.Identifier(staged.schema, staged.name)
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in staged.columns)
    execute(
        connection,
        sql.SQL("DELETE FROM {} WHERE {} = {}").format(parent, sql.Identifier("as_of"), sql.Literal(as_of)),
    )
    execute(
        connection,
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(parent, columns, columns, staging),
    )
    execute(connection, sql.SQL("DROP TABLE {}").format(staging))


def partition_name(table_name: str, as_of: dt.date) -> str:
    """Return the name of the partition of ``table_name`` that contains the ``as_of`` rows."""
    return f"{table_name}_{as_of:%Y%m%d}"


def is_partitioned_by_as_of(connection: Connection, schema: str, table_name: str) -> bool:
    """Return whether the output table is partitioned by ``LIST (as_of)`` (False for a plain table).

    Raises RuntimeError when the table is missing or is neither a plain table nor
    partitioned that way.
    """
    row = connection.execute(
        sa.text(
            "SELECT c.relkind, pg_get_partkeydef(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relname = :name"
        ),
        {"schema": schema, "name": table_name},
    ).first()
    if row is None:
        raise RuntimeError(
            f"output table {schema}.{table_name} does not exist; run `fulcrum init-db` to "
            f"create the output tables"
        )
    kind, partition_key = row
    if kind == "r":
        return False
    if kind == "p" and partition_key == PARTITION_BY_AS_OF:
        return True
    found = f"partitioned by {partition_key}" if kind == "p" else f"of relkind {kind!r}"
    raise RuntimeError(
        f"output table {schema}.{table_name} is {found}, but publishing needs a plain table or "
        f"one partitioned by {PARTITION_BY_AS_OF}. Rename it and run `fulcrum init-db` to "
        f"create it anew"
    )


def find_partition(
    connection: Connection, schema: str, table_name: str, as_of: dt.date
) -> tuple[str, str] | None:
    """Return the schema and name of the partition of the table whose bound is ``as_of``, or None.

    The partition is found by its bound, not its name, so one attached under another name is
    replaced too.
    """
    row = connection.execute(
        sa.text(
            "SELECT child_namespace.nspname, child.relname FROM pg_inherits i "
            "JOIN pg_class parent ON parent.oid = i.inhparent "
            "JOIN pg_namespace parent_namespace ON parent_namespace.oid = parent.relnamespace "
            "JOIN pg_class child ON child.oid = i.inhrelid "
            "JOIN pg_namespace child_namespace ON child_namespace.oid = child.relnamespace "
            "WHERE parent_namespace.nspname = :schema AND parent.relname = :name "
            "AND pg_get_expr(child.relpartbound, child.oid) "
            "= format('FOR VALUES IN (%L)', CAST(:as_of AS date))"
        ),
        {"schema": schema, "name": table_name, "as_of": as_of},
    ).first()
    return None if row is None else (row[0], row[1])


def drop_abandoned_staging_tables(connection: Connection, schema: str) -> list[str]:
    """Drop the staging tables in ``schema`` whose server process has ended; return their names.

    Runs in the caller's transaction. A server process whose start time the role cannot see counts as running, so its staging
    tables are kept.
    """
    candidates = connection.execute(
        sa.text(
            "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relkind = 'r' AND NOT c.relispartition "
            "AND obj_description(c.oid, 'pg_class') LIKE :prefix"
        ),
        {"schema": schema, "prefix": f"{STAGING_COMMENT_PREFIX} %"},
    ).all()
    if not candidates:
        return []
    running = dict(
        connection.execute(
            sa.text(
                "SELECT pid, CAST(extract(epoch FROM backend_start) * 1000000 AS bigint) "
                "FROM pg_stat_activity"
            )
        ).all()
    )
    abandoned = []
    for name, comment in candidates:
        match = _STAGING_COMMENT.match(comment)
        if match is None:
            continue
        pid, started = int(match.group(1)), int(match.group(2))
        if pid in running and running[pid] in (None, started):
            continue
        execute(connection, sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, name)))
        abandoned.append(name)
    for name in abandoned:
        logger.warning(
            "dropped staging table %s.%s: the publish that created it ended before swapping it in",
            schema, name,
        )
    return abandoned


def drop_staging_tables(engine: Engine, staged: list[StagedTable]) -> None:
    """Drop the staging tables of a publish that failed, on a new connection.

    A drop that fails is logged, not raised, so that the caller's error is the one reported.
    A later publish drops the tables left behind once the server process that created them
    has ended.
    """
    if not staged:
        return
    names = [sql.Identifier(staged_table.schema, staged_table.name) for staged_table in staged]
    try:
        with engine.begin() as connection:
            execute(connection, sql.SQL("DROP TABLE IF EXISTS {}").format(sql.SQL(", ").join(names)))
    except SQLAlchemyError as exc:
        qualified = ", ".join(f"{staged_table.schema}.{staged_table.name}" for staged_table in staged)
        logger.warning(
            "could not drop the staging tables %s after a failed publish (%s). A later publish "
            "drops them once the server process that created them has ended",
            qualified, exc,
        )


def execute(connection: Connection, statement: sql.Composable) -> None:
    """Run one composed statement through SQLAlchemy, so its errors are translated as usual."""
    text = statement.as_string(connection.connection.driver_connection)
    connection.execution_options(no_parameters=True).exec_driver_sql(text)


def _staging_comment(connection: Connection) -> str:
    pid, started = connection.execute(
        sa.text(
            "SELECT pid, CAST(extract(epoch FROM backend_start) * 1000000 AS bigint) "
            "FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
    ).one()
    return f"{STAGING_COMMENT_PREFIX} of server process {pid} started at {started} us since 1970"


def _report_unpartitioned(schema: str, table_name: str) -> None:
    qualified = f"{schema}.{table_name}"
    if qualified in _reported_unpartitioned:
        return
    _reported_unpartitioned.add(qualified)
    logger.warning(
        "output table %s is not partitioned by as_of, so publishing deletes the date's rows and "
        "inserts the staged ones, which takes longer than swapping a partition. To partition "
        "it, rename it, run `fulcrum init-db` and publish its dates again",
        qualified,
    )


def _resolve_schema(connection: Connection, schema: str | None) -> str:
    if schema is not None:
        return schema
    return connection.execute(sa.text("SELECT current_schema()")).scalar_one()


def _check_date(as_of: dt.date) -> None:
    if isinstance(as_of, dt.datetime) or not isinstance(as_of, dt.date):
        raise TypeError(
            f"as_of must be a datetime.date naming the partition; got {type(as_of).__name__} "
            f"{as_of!r}. Pass the date alone, for example {dt.date(2024, 4, 1)!r}"
        )
