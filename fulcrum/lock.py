"""The run lock: a row in the warehouse, so that one run at a time writes the output tables.

The lock is a row of the table ``fulcrum_locks``, one row per lock name, taken with a plain
INSERT that fails on the primary key while another run holds it. It works the same way on
SQLite and PostgreSQL, and the row shows who holds the lock: the Fulcrum run id, the Prefect
flow run id, the host, the process id, the process identity ``host:pid:start`` and when it
was acquired. The holder deletes its row when it ends.

The next run that wants the lock deletes a row that is abandoned. A row is abandoned when it
is older than ``run_lock_stale_seconds``, or at once when its process ran on this host and no
longer runs, as after a run killed with SIGKILL or a reboot. The process start time in the
identity distinguishes a dead holder from a later process that reuses its pid. A holder on another
host cannot be checked, so its row is kept until it is stale.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError, SQLAlchemyError

from fulcrum.timing import measured
from fulcrum.contract import current_process_identity
from fulcrum.settings import Settings
from fulcrum.warehouse import process_is_running

logger = logging.getLogger(__name__)

LOCK_TABLE = "fulcrum_locks"
SCORES_LOCK = "scores"
"""The lock a run takes before it writes lead_scores, account_ltv, the frontier or score_runs."""

POLL_SECONDS = 1.0


def define_lock_table(metadata: MetaData, schema: str | None = None) -> Table:
    """Define the lock table, which has one row per lock that a run holds."""
    return Table(
        LOCK_TABLE,
        metadata,
        Column("name", String(64), primary_key=True),
        Column("run_id", String(64), nullable=False),
        Column("flow_run_id", String(64), nullable=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("acquired_at", DateTime(timezone=True), nullable=False),
        # The holder's ``host:pid:start`` (see fulcrum.contract.current_process_identity).
        # Rows written by earlier versions have none.
        Column("process", Text, nullable=True),
        schema=schema,
    )


@dataclass(frozen=True)
class LockHolder:
    """The run that holds a lock, as recorded in its row."""

    run_id: str
    flow_run_id: str | None
    host: str
    pid: int
    acquired_at: dt.datetime
    process: str | None = None

    def age_seconds(self, now: dt.datetime) -> float:
        return (now - self.acquired_at).total_seconds()

    @property
    def process_identity(self) -> str:
        """The holder's ``host:pid:start``, with an empty start for a row without one."""
        return self.process or f"{self.host}:{self.pid}:"

    def process_has_ended(self) -> bool:
        """Return whether the holder's process ran on this host and no longer runs.

        A pid that now belongs to a process with another start time, or to a zombie, counts
        as ended. A holder on another host, or one whose state cannot be read, has not ended.

        NOTE: Two containers that share a host name but not a process namespace would each
        see the other's process as gone. Give each worker container its own host name.
        """
        return process_is_running(self.process_identity) is False

    def describe(self) -> str:
        flow_run = self.flow_run_id or "none"
        return (
            f"run {self.run_id} (Prefect flow run {flow_run}, host {self.host}, pid {self.pid}) "
            f"since {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC"
        )


class RunLockTimeout(TimeoutError):
    """Another run held the run lock for longer than this run was allowed to wait."""

    def __init__(self, name: str, holder: LockHolder, waited_seconds: float) -> None:
        self.name = name
        self.holder = holder
        super().__init__(
            f"timed out after {waited_seconds:.0f} s waiting for the run lock {name!r}, "
            f"held by {holder.describe()}. Wait for that run to finish, or raise "
            f"run_lock_wait_seconds; if that run is dead, delete its row from {LOCK_TABLE}"
        )


class RunLock:
    """A named lock row in the warehouse's ``fulcrum_locks`` table."""

    def __init__(
        self,
        engine: Engine,
        schema: str | None = None,
        name: str = SCORES_LOCK,
        wait_seconds: float = 3600,
        stale_seconds: float = 6 * 3600,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.engine = engine
        self.schema = schema
        self.name = name
        self.wait_seconds = wait_seconds
        self.stale_seconds = stale_seconds
        self.poll_seconds = poll_seconds
        self.table = define_lock_table(MetaData(), schema=schema)

    @classmethod
    def from_settings(
        cls, engine: Engine, settings: Settings, name: str = SCORES_LOCK
    ) -> RunLock:
        return cls(
            engine,
            schema=settings.output_schema,
            name=name,
            wait_seconds=settings.run_lock_wait_seconds,
            stale_seconds=settings.run_lock_stale_seconds,
        )

    def create_table(self) -> None:
        """Create the lock table, and on PostgreSQL its schema, unless they exist.

        A lock table made by an earlier version gets the nullable column ``process``.
        """
        if self.schema is not None and self.engine.dialect.name == "postgresql":
            with self.engine.begin() as connection:
                connection.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        try:
            self.table.create(self.engine, checkfirst=True)
        except DatabaseError:
            # Two runs that start at once on a new warehouse can both find the table missing,
            # so the CREATE of the slower one fails although the table then exists.
            if not sa.inspect(self.engine).has_table(LOCK_TABLE, schema=self.schema):
                raise
        if not self._has_process_column():
            self._add_process_column()

    def _has_process_column(self) -> bool:
        columns = sa.inspect(self.engine).get_columns(LOCK_TABLE, schema=self.schema)
        return any(column["name"] == "process" for column in columns)

    def _add_process_column(self) -> None:
        preparer = self.engine.dialect.identifier_preparer
        statement = f"ALTER TABLE {preparer.format_table(self.table)} ADD COLUMN process TEXT"
        try:
            with self.engine.begin() as connection:
                connection.exec_driver_sql(statement)
        except DatabaseError:
            # Two runs that start at once can both find the column missing, so the slower
            # one's ALTER fails although the column then exists.
            if not self._has_process_column():
                raise

    def read_holder(self) -> LockHolder | None:
        """Return the run that holds the lock, or None when no run holds it."""
        query = sa.select(self.table).where(self.table.c.name == self.name)
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        if row is None:
            return None
        acquired_at = row["acquired_at"]
        if acquired_at.tzinfo is None:
            # SQLite returns the stored UTC time without its zone.
            acquired_at = acquired_at.replace(tzinfo=dt.timezone.utc)
        return LockHolder(
            run_id=row["run_id"],
            flow_run_id=row["flow_run_id"],
            host=row["host"],
            pid=row["pid"],
            acquired_at=acquired_at,
            process=row["process"],
        )

    def try_acquire(self, run_id: str, flow_run_id: str | None) -> bool:
        """Insert this run's lock row; return False when another run's row is there."""
        values = {
            "name": self.name,
            "run_id": run_id,
            "flow_run_id": None if flow_run_id is None else str(flow_run_id),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": dt.datetime.now(dt.timezone.utc),
            "process": current_process_identity(),
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert().values(**values))
        except IntegrityError:
            return False
        return True

    @measured
    def acquire(
        self,
        run_id: str,
        flow_run_id: str | None,
        log: logging.Logger | logging.LoggerAdapter = logger,
    ) -> None:
        """Take the lock, waiting up to ``wait_seconds`` for the run that holds it.

        Raises RunLockTimeout, naming the holder, when the wait runs out.
        """
        self.create_table()
        started = time.monotonic()
        announced_run_id = None
        while True:
            if self.try_acquire(run_id, flow_run_id):
                log.info("Acquired the run lock %r for run %s", self.name, run_id)
                return

            holder = self.read_holder()
            if holder is None:
                # The holder released the lock between our INSERT and our SELECT.
                continue
            abandoned = self.abandoned_reason(holder)
            if abandoned is not None:
                # Of several runs that find the same abandoned row, only the one whose DELETE
                # removed it logs, and then all of them compete for the lock with the INSERT.
                if self.remove_abandoned(holder):
                    log.warning(
                        "Deleted the abandoned run lock %r of run %s (process %s, Prefect flow "
                        "run %s, since %s UTC): %s",
                        self.name, holder.run_id, holder.process_identity,
                        holder.flow_run_id or "none",
                        f"{holder.acquired_at:%Y-%m-%d %H:%M:%S}", abandoned,
                    )
                continue

            waited = time.monotonic() - started
            if waited >= self.wait_seconds:
                raise RunLockTimeout(self.name, holder, waited)
            if holder.run_id != announced_run_id:
                log.info(
                    "Waiting up to %.0f s for the run lock %r, held by %s",
                    self.wait_seconds - waited, self.name, holder.describe(),
                )
                announced_run_id = holder.run_id
            time.sleep(min(self.poll_seconds, self.wait_seconds - waited))

    def abandoned_reason(self, holder: LockHolder) -> str | None:
        """Return why the holder's lock counts as abandoned, or None while it may be live."""
        age = holder.age_seconds(dt.datetime.now(dt.timezone.utc))
        if age > self.stale_seconds:
            return (
                f"it was acquired {age:.0f} s ago, more than run_lock_stale_seconds "
                f"({self.stale_seconds:.0f} s)"
            )
        if holder.process_has_ended():
            return f"its process {holder.process_identity} no longer runs on this host"
        return None

    def remove_abandoned(self, holder: LockHolder) -> bool:
        """Delete the lock row of ``holder`` and return True, or return False if it is gone.

        The DELETE matches the holder's run id, host and pid. Each run inserts its row with
        its own run id, so the DELETE never removes a row that another run inserted after
        ``holder`` was read.
        """
        statement = sa.delete(self.table).where(
            self.table.c.name == self.name,
            self.table.c.run_id == holder.run_id,
            self.table.c.host == holder.host,
            self.table.c.pid == holder.pid,
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    @measured
    def release(
        self, run_id: str, log: logging.Logger | logging.LoggerAdapter = logger
    ) -> None:
        """Delete this run's lock row.

        A failure to delete is logged and not raised, so that it does not hide the run's own
        outcome. The row then counts as abandoned after ``run_lock_stale_seconds``.
        """
        try:
            deleted = self._delete(run_id)
        except SQLAlchemyError as exc:
            log.error(
                "Could not release the run lock %r of run %s: %s. Other runs will take "
                "it over after run_lock_stale_seconds (%.0f s), or delete its row from %s",
                self.name, run_id, exc, self.stale_seconds, LOCK_TABLE,
            )
            return
        if deleted:
            log.info("Released the run lock %r of run %s", self.name, run_id)
        else:
            log.warning(
                "The run lock %r was no longer held by run %s when it ended: another run "
                "took it over as stale. Raise run_lock_stale_seconds above the longest run",
                self.name, run_id,
            )

    @contextmanager
    def hold(
        self,
        run_id: str,
        flow_run_id: str | None,
        log: logging.Logger | logging.LoggerAdapter = logger,
    ) -> Iterator[None]:
        """Hold the lock for the duration of a ``with`` block."""
        self.acquire(run_id, flow_run_id, log)
        try:
            yield
        finally:
            self.release(run_id, log)

    def _delete(self, run_id: str) -> int:
        statement = sa.delete(self.table).where(
            self.table.c.name == self.name, self.table.c.run_id == run_id
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount
