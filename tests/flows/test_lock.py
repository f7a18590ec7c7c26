"""The run lock: one run at a time writes a warehouse, and a waiting run names the holder."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa

from flows.nightly import StageError, nightly_scores
from fulcrum.contract import current_process_identity, process_start_ticks
from fulcrum.lock import LOCK_TABLE, RunLock, RunLockTimeout
from fulcrum.settings import load_settings
from fulcrum.warehouse import create_engine_for
from tests.flows.conftest import AS_OF, copy_sqlite, point_settings_at


@pytest.fixture
def engine(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'warehouse.db'}")
    yield engine
    engine.dispose()


def insert_holder(
    engine,
    run_id: str,
    host: str,
    pid: int,
    acquired_at: dt.datetime,
    process: str | None = None,
) -> None:
    lock = RunLock(engine)
    lock.create_table()
    with engine.begin() as connection:
        connection.execute(
            lock.table.insert().values(
                name="scores", run_id=run_id, flow_run_id=None, host=host, pid=pid,
                acquired_at=acquired_at, process=process,
            )
        )


def insert_process_holder(engine, run_id: str, process: str) -> None:
    """Insert a lock row held, as of now, by the process ``host:pid:start``."""
    host, pid, _ = process.rsplit(":", 2)
    insert_holder(engine, run_id, host, int(pid), dt.datetime.now(dt.timezone.utc), process)


@pytest.fixture
def child_process():
    """A Python child process on this host that runs until its stdin is closed."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    yield child
    if child.poll() is None:
        child.kill()
    child.stdin.close()
    child.wait()


def identity_of(child: subprocess.Popen) -> str:
    """Return the child's ``host:pid:start``, as its own current_process_identity would."""
    start = process_start_ticks(child.pid)
    if start is None:
        pytest.skip("process start times come from /proc, which this system lacks")
    return f"{socket.gethostname()}:{child.pid}:{start}"


def end(child: subprocess.Popen) -> None:
    child.stdin.close()
    child.wait(timeout=30)


def takeover_warnings(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "abandoned run lock" in record.getMessage()
    ]


def test_second_run_times_out_naming_holder(engine):
    RunLock(engine).acquire("run-a", "flow-run-a")
    waiter = RunLock(engine, wait_seconds=0.5, poll_seconds=0.1)

    started = time.monotonic()
    with pytest.raises(RunLockTimeout) as raised:
        waiter.acquire("run-b", "flow-run-b")

    assert time.monotonic() - started >= 0.5
    message = str(raised.value)
    assert "held by run run-a" in message
    assert "Prefect flow run flow-run-a" in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    assert raised.value.holder.run_id == "run-a"


def test_waiting_run_gets_lock_after_release(engine):
    holder = RunLock(engine)
    holder.acquire("run-a", None)
    releaser = threading.Timer(0.5, holder.release, args=("run-a",))
    releaser.start()

    RunLock(engine, wait_seconds=30, poll_seconds=0.1).acquire("run-b", None)

    releaser.join()
    assert RunLock(engine).read_holder().run_id == "run-b"


def test_release_deletes_only_own_row(engine):
    lock = RunLock(engine)
    lock.acquire("run-a", None)

    lock.release("run-b")
    assert lock.read_holder().run_id == "run-a"
    lock.release("run-a")
    assert lock.read_holder() is None


def test_stale_lock_is_taken_over(engine):
    two_hours_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    insert_holder(engine, "old-run", "another-host", 1, two_hours_ago)

    RunLock(engine, wait_seconds=0, stale_seconds=3600).acquire("run-b", None)

    assert RunLock(engine).read_holder().run_id == "run-b"


def test_lock_of_ended_process_taken_over(engine):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    pid = int(ended.stdout)
    insert_holder(engine, "killed-run", socket.gethostname(), pid, dt.datetime.now(dt.timezone.utc))

    RunLock(engine, wait_seconds=0).acquire("run-b", None)

    assert RunLock(engine).read_holder().run_id == "run-b"


def test_recent_remote_lock_is_kept(engine):
    insert_holder(engine, "remote-run", "another-host", 1, dt.datetime.now(dt.timezone.utc))

    with pytest.raises(RunLockTimeout, match="held by run remote-run"):
        RunLock(engine, wait_seconds=0).acquire("run-b", None)


def test_acquired_row_records_process_identity(engine):
    lock = RunLock(engine)

    lock.acquire("run-a", None)

    holder = lock.read_holder()
    assert holder.process == current_process_identity()
    assert holder.process_identity == current_process_identity()


def test_dead_process_lock_taken_at_once(engine, child_process, caplog):
    process = identity_of(child_process)
    end(child_process)
    insert_process_holder(engine, "killed-run", process)

    with caplog.at_level(logging.WARNING, logger="fulcrum.lock"):
        RunLock(engine, wait_seconds=0).acquire("run-b", None)

    assert RunLock(engine).read_holder().run_id == "run-b"
    warnings = takeover_warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"Deleted the abandoned run lock 'scores' of run killed-run (process {process}, "
    )
    assert warnings[0].endswith(f": its process {process} no longer runs on this host")


def test_live_process_lock_is_kept(engine, child_process, caplog):
    process = identity_of(child_process)
    insert_process_holder(engine, "live-run", process)

    with caplog.at_level(logging.WARNING, logger="fulcrum.lock"):
        with pytest.raises(RunLockTimeout, match="held by run live-run"):
            RunLock(engine, wait_seconds=0).acquire("run-b", None)

    assert RunLock(engine).read_holder().process == process
    assert takeover_warnings(caplog) == []


def test_dead_process_on_other_host_kept(engine, child_process, caplog):
    _, pid, start = identity_of(child_process).split(":")
    end(child_process)
    insert_process_holder(engine, "remote-run", f"another-host:{pid}:{start}")

    with caplog.at_level(logging.WARNING, logger="fulcrum.lock"):
        with pytest.raises(RunLockTimeout, match="held by run remote-run"):
            RunLock(engine, wait_seconds=0).acquire("run-b", None)

    assert RunLock(engine).read_holder().run_id == "remote-run"
    assert takeover_warnings(caplog) == []


def test_reused_pid_lock_taken_at_once(engine):
    host, pid, start = current_process_identity().split(":")
    if not start:
        pytest.skip("process start times come from /proc, which this system lacks")
    # This process's pid with an earlier start time: the pid now belongs to another process.
    insert_process_holder(engine, "killed-run", f"{host}:{pid}:{int(start) - 1}")

    RunLock(engine, wait_seconds=0).acquire("run-b", None)

    assert RunLock(engine).read_holder().run_id == "run-b"


def test_unreadable_process_identity_kept(engine, child_process):
    identity_of(child_process)
    end(child_process)
    # The pid column names a dead process, but the identity cannot be read, so its state is unknown.
    insert_holder(
        engine, "odd-run", socket.gethostname(), child_process.pid,
        dt.datetime.now(dt.timezone.utc), process="not-an-identity",
    )

    with pytest.raises(RunLockTimeout, match="held by run odd-run"):
        RunLock(engine, wait_seconds=0).acquire("run-b", None)


def test_abandoned_row_removed_only_once(engine, child_process):
    process = identity_of(child_process)
    end(child_process)
    insert_process_holder(engine, "killed-run", process)
    lock = RunLock(engine)
    dead = lock.read_holder()

    assert lock.remove_abandoned(dead) is True
    assert lock.try_acquire("run-b", None) is True
    assert lock.remove_abandoned(dead) is False
    assert lock.read_holder().run_id == "run-b"


def test_racing_waiters_take_dead_lock_once(engine, child_process, caplog):
    process = identity_of(child_process)
    end(child_process)
    insert_process_holder(engine, "killed-run", process)
    start = threading.Barrier(4)
    acquired, timed_out = [], []

    def wait_for_lock(run_id: str) -> None:
        start.wait()
        try:
            RunLock(engine, wait_seconds=0).acquire(run_id, None)
        except RunLockTimeout as exc:
            timed_out.append(exc.holder.run_id)
        else:
            acquired.append(run_id)

    with caplog.at_level(logging.WARNING, logger="fulcrum.lock"):
        threads = [
            threading.Thread(target=wait_for_lock, args=(f"run-{number}",)) for number in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert len(acquired) == 1
    assert timed_out == acquired * 3
    assert RunLock(engine).read_holder().run_id == acquired[0]
    assert len(takeover_warnings(caplog)) == 1


def test_old_lock_table_gains_process_column(engine):
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE fulcrum_locks (name VARCHAR(64) PRIMARY KEY, "
            "run_id VARCHAR(64) NOT NULL, flow_run_id VARCHAR(64), host VARCHAR(255) NOT NULL, "
            "pid INTEGER NOT NULL, acquired_at DATETIME NOT NULL)"
        )
        connection.exec_driver_sql(
            "INSERT INTO fulcrum_locks VALUES ('scores', 'old-run', NULL, 'another-host', 1, "
            "'2026-07-01 12:00:00.000000')"
        )
    lock = RunLock(engine)

    lock.create_table()

    columns = {column["name"] for column in sa.inspect(engine).get_columns(LOCK_TABLE)}
    assert "process" in columns
    holder = lock.read_holder()
    assert holder.process is None
    assert holder.process_identity == "another-host:1:"


def test_threads_never_hold_lock_together(engine):
    intervals: list[tuple[float, float]] = []

    def work(worker: int) -> None:
        lock = RunLock(engine, wait_seconds=60, poll_seconds=0.02)
        for attempt in range(3):
            run_id = f"run-{worker}-{attempt}"
            with lock.hold(run_id, None):
                entered = time.monotonic()
                time.sleep(0.05)
                intervals.append((entered, time.monotonic()))

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(intervals) == 12
    ordered = sorted(intervals)
    for (_, first_end), (second_start, _) in zip(ordered, ordered[1:]):
        assert second_start >= first_end


@pytest.mark.postgres
def test_postgres_dead_process_lock_taken(postgres_url, child_process, caplog):
    process = identity_of(child_process)
    end(child_process)
    engine = create_engine_for(postgres_url)
    try:
        lock = RunLock(engine, schema="lock_takeover_test", wait_seconds=0)
        lock.create_table()
        host, pid, _ = process.rsplit(":", 2)
        with engine.begin() as connection:
            connection.execute(
                lock.table.insert().values(
                    name="scores", run_id="killed-run", flow_run_id=None, host=host,
                    pid=int(pid), acquired_at=dt.datetime.now(dt.timezone.utc), process=process,
                )
            )

        with caplog.at_level(logging.WARNING, logger="fulcrum.lock"):
            lock.acquire("run-b", None)

        assert lock.read_holder().run_id == "run-b"
        assert lock.read_holder().process == current_process_identity()
        assert len(takeover_warnings(caplog)) == 1
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text("DROP SCHEMA IF EXISTS lock_takeover_test CASCADE"))
        engine.dispose()


@pytest.mark.postgres
def test_postgres_old_lock_table_gains_process_column(postgres_url):
    engine = create_engine_for(postgres_url)
    try:
        RunLock(engine, schema="lock_upgrade_test").create_table()
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "ALTER TABLE lock_upgrade_test.fulcrum_locks DROP COLUMN process"
            )

        RunLock(engine, schema="lock_upgrade_test").acquire("run-a", None)

        holder = RunLock(engine, schema="lock_upgrade_test").read_holder()
        assert holder.process == current_process_identity()
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text("DROP SCHEMA IF EXISTS lock_upgrade_test CASCADE"))
        engine.dispose()


@pytest.mark.postgres
def test_postgres_lock_conflict_names_holder(postgres_url):
    engine = create_engine_for(postgres_url)
    try:
        RunLock(engine, schema="lock_test").acquire("run-a", "flow-run-a")
        with pytest.raises(RunLockTimeout, match="held by run run-a"):
            RunLock(engine, schema="lock_test", wait_seconds=0.2, poll_seconds=0.05).acquire(
                "run-b", None
            )
        RunLock(engine, schema="lock_test").release("run-a")
        assert RunLock(engine, schema="lock_test").try_acquire("run-b", None)
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text("DROP SCHEMA IF EXISTS lock_test CASCADE"))
        engine.dispose()


@pytest.fixture
def labels_only_env(small_company_db, tmp_path, monkeypatch, prefect_api):
    """A private copy of the small company, with the CRM declared absent.

    Runs then label accounts and publish account_ltv without any model, so they take seconds.
    The lock is taken and released the same way as in a full run.
    """
    copy_sqlite(small_company_db, tmp_path / "warehouse.db")
    point_settings_at(monkeypatch, tmp_path, tmp_path / "mlartifacts")
    monkeypatch.setenv(
        "FULCRUM_SOURCES",
        '{"leads": {"absent": true}, "lead_events": {"absent": true}, '
        '"opportunities": {"absent": true}}',
    )
    return tmp_path


def read(sql: str) -> pd.DataFrame:
    engine = sa.create_engine(load_settings().warehouse_url.get_secret_value())
    with engine.connect() as connection:
        frame = pd.read_sql_query(sa.text(sql), connection)
    engine.dispose()
    return frame


@pytest.mark.slow
def test_run_waiting_too_long_fails_in_lock_stage(labels_only_env, monkeypatch):
    monkeypatch.setenv("FULCRUM_RUN_LOCK_WAIT_SECONDS", "1")
    settings = load_settings()
    holder_engine = create_engine_for(settings.warehouse_url.get_secret_value())
    RunLock(holder_engine).acquire("other-run", "other-flow-run")

    state = nightly_scores(as_of=AS_OF, return_state=True)

    assert state.is_failed()
    assert "stage 'lock' failed" in state.message
    assert "held by run other-run (Prefect flow run other-flow-run" in state.message
    with pytest.raises(StageError, match="stage 'lock' failed"):
        state.result()
    failed = read("SELECT * FROM score_runs WHERE status = 'failed'")
    assert failed["failed_stage"].tolist() == ["lock"]
    assert "other-run" in failed["message"].iloc[0]
    holder_engine.dispose()


@pytest.mark.slow
def test_two_runs_at_once_never_interleave(labels_only_env):
    as_of = AS_OF
    results, errors = [], []

    def run() -> None:
        try:
            results.append(nightly_scores(as_of=as_of))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    runs = read(
        f"SELECT run_id, started_at, finished_at FROM score_runs "
        f"WHERE as_of = '{as_of}' AND status = 'succeeded' ORDER BY started_at"
    )
    assert len(runs) == 2
    first, second = runs.iloc[0], runs.iloc[1]
    assert pd.Timestamp(second["started_at"]) >= pd.Timestamp(first["finished_at"])
    partition = read(
        f"SELECT run_id, COUNT(*) AS n FROM account_ltv WHERE as_of = '{as_of}' GROUP BY run_id"
    )
    assert partition["run_id"].tolist() == [second["run_id"]]
    last = next(result for result in results if result.run_id == second["run_id"])
    assert int(partition["n"].iloc[0]) == last.accounts_labelled > 0
    assert read(f"SELECT COUNT(*) AS n FROM {LOCK_TABLE}")["n"].iloc[0] == 0
