"""The warehouse behind a small interface: engines, source selectables and output tables."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from fulcrum.timing import measured
from fulcrum.contract import SOURCES, define_output_tables, process_start_ticks
from fulcrum.settings import Settings, SourceSpec, redact_url

logger = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_SECONDS = 60.0
ABANDONED_RUN_MESSAGE = "process ended without recording an outcome"

# SQLite result codes of failures that can pass when the statement is tried again.
_SQLITE_TRANSIENT_ERRORS = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN"}
# PostgreSQL's SQLSTATE for a statement that gave up waiting for a lock (lock_timeout).
_POSTGRES_LOCK_NOT_AVAILABLE = "55P03"


class SourceMappingError(RuntimeError):
    """A source mapping points at a table or query that cannot be read."""


class WarehouseLockedError(RuntimeError):
    """A statement gave up waiting for a lock that another writer holds on the warehouse."""


def create_engine_for(
    url: str, lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS
) -> Engine:
    """Create an engine that waits at most ``lock_timeout_seconds`` for another writer's lock.

    For a SQLite file, the folder is created and WAL is enabled. A statement that times out
    waiting for a lock raises WarehouseLockedError on SQLite and PostgreSQL alike.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": lock_timeout_seconds})

        @sa.event.listens_for(engine, "connect")
        def _configure_sqlite(dbapi_connection, _record):  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    elif parsed.get_backend_name() == "postgresql":
        if parsed.get_driver_name() in ("", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        # Sessions run in UTC so that naive timestamps and casts to timestamptz mean UTC,
        # whatever the server's default time zone is.
        options = f"-c timezone=UTC -c lock_timeout={round(lock_timeout_seconds * 1000)}"
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={"options": options})
    else:
        engine = sa.create_engine(parsed, pool_pre_ping=True)

    _raise_lock_timeouts_as_locked(engine, lock_timeout_seconds)
    return engine


def _raise_lock_timeouts_as_locked(engine: Engine, lock_timeout_seconds: float) -> None:
    @sa.event.listens_for(engine, "handle_error")
    def _translate_lock_timeout(context):
        if not is_lock_timeout(context.original_exception):
            return
        statement = " ".join((context.statement or "").split())[:80]
        raise WarehouseLockedError(
            f"the warehouse is locked by another writer: the statement {statement!r} waited "
            f"{lock_timeout_seconds:g} s (warehouse_lock_timeout_seconds) and gave up. Try "
            f"again when the other writer has finished, or raise warehouse_lock_timeout_seconds"
        )


def is_lock_timeout(error: BaseException | None) -> bool:
    """Return whether a DBAPI error means a statement gave up waiting for another writer's lock."""
    if error is None:
        return False
    if getattr(error, "sqlstate", None) == _POSTGRES_LOCK_NOT_AVAILABLE:
        return True
    name = getattr(error, "sqlite_errorname", None)
    return name in ("SQLITE_BUSY", "SQLITE_LOCKED") or "database is locked" in str(error)


def is_transient_error(error: BaseException) -> bool:
    """Return whether a failed warehouse read may succeed when tried again on a new connection.

    Transient: a dropped or refused connection, a lock timeout, a pool timeout, a PostgreSQL
    OperationalError, and SQLite's busy, locked, I/O and cannot-open errors. A SQL error (a
    missing table or column, bad syntax, a type error) is not.
    """
    if isinstance(error, WarehouseLockedError):
        return True
    if isinstance(error, (sa.exc.DisconnectionError, sa.exc.TimeoutError)):
        return True
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    if not isinstance(error, sa.exc.OperationalError):
        return False
    sqlite_name = getattr(error.orig, "sqlite_errorname", None)
    if sqlite_name is not None:
        # Extended codes such as SQLITE_IOERR_SHORT_READ share their primary code's meaning.
        primary = "_".join(sqlite_name.split("_")[:2])
        return primary in _SQLITE_TRANSIENT_ERRORS
    return True


def describe_database_error(error: BaseException) -> str:
    """Return the DBAPI error's type and first line, without the SQL and its parameters."""
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines() or [""]
    return f"{type(original).__name__}: {lines[0]}"


@contextmanager
def read_only_connection(engine: Engine) -> Iterator[Connection]:
    """Open a connection on which the database rejects any write.

    A SQL source mapping is the user's text, and reading it must not change the warehouse:
    PostgreSQL runs the transaction READ ONLY, and SQLite sets ``PRAGMA query_only``.
    """
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            yield connection.execution_options(postgresql_readonly=True)
            return
        if engine.dialect.name != "sqlite":
            yield connection
            return

        connection.exec_driver_sql("PRAGMA query_only = ON")
        try:
            yield connection
        finally:
            try:
                connection.rollback()
                connection.exec_driver_sql("PRAGMA query_only = OFF")
            except SQLAlchemyError:
                # A connection that cannot be reset must not go back to the pool read-only.
                connection.invalidate()


@dataclass
class Warehouse:
    """A warehouse connection plus the contract's output tables in the configured schema."""

    engine: Engine
    schema: str | None = None
    metadata: sa.MetaData = field(default_factory=sa.MetaData)

    def __post_init__(self) -> None:
        self.outputs = define_output_tables(self.metadata, schema=self.schema)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Warehouse":
        engine = create_engine_for(
            settings.warehouse_url.get_secret_value(), settings.warehouse_lock_timeout_seconds
        )
        return cls(engine=engine, schema=settings.output_schema)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=False))

    @measured
    def create_output_tables(self) -> list[str]:
        """Create the output tables that do not exist yet; return the names created.

        Tables created by an earlier version get the nullable columns added since, and on
        PostgreSQL their VARCHAR(n) columns that are now Text are widened. A per-date table
        that exists unpartitioned on PostgreSQL is not converted to a partitioned one, and
        publishing falls back to DELETE and INSERT for it.
        """
        inspector = sa.inspect(self.engine)
        existing = set(inspector.get_table_names(schema=self.schema))
        if self.schema is not None and self.dialect == "postgresql":
            with self.engine.begin() as connection:
                connection.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        self.metadata.create_all(self.engine, checkfirst=True)
        self._upgrade_tables(inspector, existing)
        return [name for name in self.outputs if name not in existing]

    def _upgrade_tables(self, inspector: sa.Inspector, existing: set[str]) -> None:
        preparer = self.engine.dialect.identifier_preparer
        statements = []
        for name, table in self.outputs.items():
            if name not in existing:
                continue
            present = {
                column["name"]: column["type"]
                for column in inspector.get_columns(name, schema=self.schema)
            }
            table_name = preparer.format_table(table)
            for column in table.columns:
                if column.name not in present:
                    if not column.nullable:
                        raise RuntimeError(
                            f"output table {name} lacks the NOT NULL column {column.name}, "
                            f"which cannot be added to a table with rows. Rename the table "
                            f"and run `fulcrum init-db` to create it anew"
                        )
                    column_type = column.type.compile(dialect=self.engine.dialect)
                    statements.append(
                        f"ALTER TABLE {table_name} ADD COLUMN {preparer.format_column(column)} "
                        f"{column_type}"
                    )
                elif (
                    self.dialect == "postgresql"
                    and isinstance(column.type, sa.Text)
                    and isinstance(present[column.name], sa.String)
                    and getattr(present[column.name], "length", None) is not None
                ):
                    statements.append(
                        f"ALTER TABLE {table_name} ALTER COLUMN {preparer.format_column(column)} "
                        f"TYPE TEXT"
                    )
        if not statements:
            return
        with self.engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
        logger.info("upgraded the output tables: %s", "; ".join(statements))

    @measured
    def fail_abandoned_runs(self, stale_after: dt.timedelta) -> list[str]:
        """Mark as failed the score_runs rows left 'running' by a process that has ended.

        A row is abandoned when its process, on this host, no longer runs, or when it
        started more than ``stale_after`` ago. A process killed mid-run cannot record its
        own outcome, so the next run does it. Returns the run ids marked.
        """
        table = self.outputs["score_runs"]
        now = dt.datetime.now(dt.timezone.utc)
        query = sa.select(table.c.run_id, table.c.started_at, table.c.process).where(
            table.c.status == "running"
        )
        marked = []
        with self.engine.begin() as connection:
            for run_id, started_at, process in connection.execute(query).all():
                reason = abandonment_reason(process, started_at, now, stale_after)
                if reason is None:
                    continue
                published = self._published_note(connection, run_id)
                message = f"{ABANDONED_RUN_MESSAGE}: {reason}. {published}"
                connection.execute(
                    sa.update(table)
                    .where(table.c.run_id == run_id, table.c.status == "running")
                    .values(status="failed", finished_at=now, message=message)
                )
                marked.append(run_id)
        for run_id in marked:
            logger.warning("marked run %s failed: its %s", run_id, ABANDONED_RUN_MESSAGE)
        return marked

    def _published_note(self, connection: Connection, run_id: str) -> str:
        counts = {}
        for name in ("lead_scores", "account_ltv"):
            table = self.outputs[name]
            query = sa.select(sa.func.count()).select_from(table).where(table.c.run_id == run_id)
            counts[name] = connection.execute(query).scalar_one()
        if not any(counts.values()):
            return "It published nothing, so the previous scores stay in place"
        return (
            f"Its scores were published before it ended: lead_scores {counts['lead_scores']:,} "
            f"rows, account_ltv {counts['account_ltv']:,} rows"
        )


def abandonment_reason(
    process: str | None, started_at: dt.datetime, now: dt.datetime, stale_after: dt.timedelta
) -> str | None:
    """Return why a 'running' score_runs row is abandoned, or None while it may be live.

    ``process`` is ``host:pid:start`` (see fulcrum.contract.current_process_identity).
    """
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=dt.timezone.utc)
    running = process_is_running(process)
    if running is False:
        host, pid, _ = process.rsplit(":", 2)
        return f"process {pid} on host {host} is no longer running"
    if now - started_at > stale_after:
        hours = (now - started_at) / dt.timedelta(hours=1)
        checked = "still runs" if running else "cannot be checked from this host"
        return (
            f"it started {hours:.1f} hours ago, more than stale_run_after_hours, and its "
            f"process {process or '(not recorded)'} {checked}"
        )
    return None


def process_is_running(process: str | None) -> bool | None:
    """Return whether the process ``host:pid:start`` still runs, or None if this host cannot tell.

    A pid that now belongs to a process with another start time, or to a zombie, counts as
    ended.
    """
    if not process or process.count(":") < 2:
        return None
    host, pid_text, start = process.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    current_start = process_start_ticks(pid)
    if start and current_start is not None and current_start != start:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def source_selectable(engine: Engine, name: str, spec: SourceSpec) -> sa.FromClause:
    """Return a FROM clause for source ``name`` as mapped by ``spec``.

    Table names are quoted by SQLAlchemy, never pasted into SQL. A SQL mapping is
    wrapped as a subquery whose columns are read from a zero-row probe.
    """
    if name not in SOURCES:
        raise SourceMappingError(f"unknown source {name!r}; expected one of {sorted(SOURCES)}")
    if spec.table is not None:
        try:
            table = sa.Table(spec.table, sa.MetaData(), schema=spec.schema_name, autoload_with=engine)
        except sa.exc.NoSuchTableError as exc:
            where = f"{spec.schema_name}.{spec.table}" if spec.schema_name else spec.table
            raise SourceMappingError(
                f"source {name!r} is mapped to table {where!r}, which does not exist in the "
                f"warehouse; create it or map the source to another table or a SQL query"
            ) from exc
        return table
    probe = sa.text(spec.sql)
    try:
        with read_only_connection(engine) as connection:
            keys = list(
                connection.execute(
                    sa.select(sa.text("*")).select_from(probe.columns().subquery("probe")).limit(0)
                ).keys()
            )
    except SQLAlchemyError as exc:
        if is_transient_error(exc):
            raise
        raise SourceMappingError(
            f"source {name!r} is mapped to a SQL query that failed: "
            f"{type(exc.orig or exc).__name__}: {str(exc.orig or exc).splitlines()[0]}. "
            f"Query starts with {spec.sql[:80]!r}"
        ) from exc
    return probe.columns(*[sa.column(key) for key in keys]).subquery(f"src_{name}")


def check_source_columns(name: str, selectable: sa.FromClause) -> None:
    """Raise SourceMappingError when a mapped source lacks a contract column."""
    present = {column.name for column in selectable.columns}
    missing = [column for column in SOURCES[name].column_names if column not in present]
    if missing:
        raise SourceMappingError(
            f"source {name!r} lacks required column(s) {missing}; it has {sorted(present)}. "
            f"Rename the columns in a SQL mapping, for example 'SELECT my_col AS {missing[0]} ...'"
        )
