"""The run lock: one run at a time writes a warehouse, and a waiting run names the holder."""

from __future__ import annotations

import datetime as dt
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
from fulcrum.lock import LOCK_TABLE, RunLock, RunLockTimeout
from fulcrum.settings import load_settings
from fulcrum.warehouse import create_engine_for
from tests.flows.conftest import AS_OF, copy_sqlite, point_settings_at


@pytest.fixture
def engine(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'warehouse.db'}")
    yield engine
    engine.dispose()


def insert_holder(engine, run_id: str, host: str, pid: int, acquired_at: dt.datetime) -> None:
    lock = RunLock(engine)
    lock.create_table()
    with engine.begin() as connection:
        connection.execute(
            lock.table.insert().values(
                name="scores", run_id=run_id, flow_run_id=None, host=host, pid=pid,
                acquired_at=acquired_at,
            )
        )


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
