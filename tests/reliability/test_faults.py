"""Faults during a run: a dropped connection, a killed process, MLflow away, a locked warehouse.

Each test runs the nightly flow on a private copy of a scored 2,000-lead company, injects
one fault, and checks that the run either recovers or stops before publishing, reports which,
and leaves the previous scores in place.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect.settings import get_current_settings

import tasks.extract as extract
import tasks.publish as publish
from flows.nightly import StageError, nightly_scores
from fulcrum.warehouse import ABANDONED_RUN_MESSAGE
from tests.reliability.checks import assert_published_nothing, assert_run_stopped, snapshot
from tests.reliability.workspace import AS_OF

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]


def dropped_connection(name: str) -> sa.exc.OperationalError:
    """The error SQLAlchemy raises when the server closes a connection mid-query."""
    return sa.exc.OperationalError(
        f"SELECT ... FROM {name}",
        {},
        ConnectionResetError("server closed the connection unexpectedly"),
        connection_invalidated=True,
    )


def fail_reads(monkeypatch, source: str, times: int) -> list[str]:
    """Make the first ``times`` reads of ``source`` drop their connection; return the log."""
    read_source = extract.read_source
    calls: list[str] = []

    def flaky_read(engine, name, query, chunk_rows):
        if name == source:
            calls.append("dropped" if len(calls) < times else "read")
            if calls[-1] == "dropped":
                raise dropped_connection(name)
        return read_source(engine, name, query, chunk_rows)

    monkeypatch.setattr(extract, "read_source", flaky_read)
    return calls


def test_dropped_connection_in_extract_is_retried(workspace, monkeypatch, caplog):
    before = snapshot(workspace)
    calls = fail_reads(monkeypatch, "invoices", times=1)

    with caplog.at_level(logging.WARNING):
        result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    assert calls == ["dropped", "read"]
    assert "reading source invoices failed on attempt 1 of 4" in caplog.text
    assert "trying again in 0.2 s" in caplog.text
    scores = workspace.scores()
    assert set(scores["lead_id"]) == set(before.lead_scores["lead_id"])
    assert scores["run_id"].unique().tolist() == [result.run_id]


def test_connection_lost_on_every_attempt_stops_extract(workspace, monkeypatch):
    before = snapshot(workspace)
    calls = fail_reads(monkeypatch, "opportunities", times=10)

    with pytest.raises(StageError) as raised:
        nightly_scores(as_of=AS_OF, retrain=False)

    assert calls == ["dropped"] * 4
    assert_run_stopped(
        workspace, before, raised.value, "extract",
        "reading source 'opportunities' failed on all 4 attempt(s)",
        "ConnectionResetError: server closed the connection unexpectedly",
    )


def test_process_killed_mid_publish_keeps_partition(workspace, caplog):
    before = snapshot(workspace)
    marker = workspace.root / "publishing"
    environment = {
        **os.environ,
        **workspace.environment(),
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "PYTHONPATH": str(REPOSITORY),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.publish_child", str(marker)],
        cwd=workspace.root,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(marker, child, timeout=180)
        # Another reader still sees the old partition while the write is in flight.
        assert_published_nothing(workspace, before)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()

    assert_published_nothing(workspace, before)
    runs = workspace.runs()
    killed = runs[~runs["run_id"].isin(before.score_runs["run_id"])]
    assert killed["status"].tolist() == ["running"]
    assert killed["process"].iloc[0].split(":")[1] == str(child.pid)

    # The killed run's lock row stays behind, and the next run deletes it at once, because
    # the process it names no longer runs on this host.
    with caplog.at_level(logging.WARNING):
        result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    killed_process = killed["process"].iloc[0]
    assert (
        f"Deleted the abandoned run lock 'scores' of run {killed['run_id'].iloc[0]} "
        f"(process {killed_process}, "
    ) in caplog.text
    assert f": its process {killed_process} no longer runs on this host" in caplog.text
    marked = workspace.read(
        "SELECT * FROM score_runs WHERE run_id = :run_id", run_id=killed["run_id"].iloc[0]
    ).iloc[0]
    assert marked["status"] == "failed"
    assert marked["finished_at"] is not None
    assert ABANDONED_RUN_MESSAGE in marked["message"]
    assert f"process {child.pid} on host {socket.gethostname()} is no longer running" in marked["message"]
    assert "It published nothing, so the previous scores stay in place" in marked["message"]
    assert set(workspace.scores()["run_id"]) == {result.run_id}


def wait_for(marker: Path, child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(
                f"the child run ended with {child.returncode} before publishing: "
                f"{child.stderr.read().decode(errors='replace')[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"the child run did not reach publishing in {timeout} s")
        time.sleep(0.2)


def closed_local_port() -> int:
    """A loopback port with no listener: bound once to pick it, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def count_source_reads(monkeypatch) -> list[str]:
    """Record the name of every source that extract reads; return the record."""
    read_source = extract.read_source
    names: list[str] = []

    def counted_read(engine, name, query, chunk_rows):
        names.append(name)
        return read_source(engine, name, query, chunk_rows)

    monkeypatch.setattr(extract, "read_source", counted_read)
    return names


def test_unreachable_mlflow_server_stops_run(workspace, monkeypatch):
    before = snapshot(workspace)
    port = closed_local_port()
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    # MLflow's defaults retry a refused connection 7 times, for about 4 minutes in all.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    reads = count_source_reads(monkeypatch)

    with pytest.raises(StageError) as raised:
        nightly_scores(as_of=AS_OF, retrain=False)

    assert reads == []
    assert str(raised.value) == (
        f"stage 'mlflow' failed: the MLflow tracking store http://127.0.0.1:{port} is "
        f"unreachable: Connection refused. Check that the MLflow server is running and that "
        f"this host can reach it, or set mlflow_tracking_uri (or "
        f"mlflow_tracking_uri_secret_block) to the right store"
    )
    row = assert_run_stopped(
        workspace, before, raised.value, "mlflow",
        f"the MLflow tracking store http://127.0.0.1:{port} is unreachable: Connection refused",
    )
    assert row["message"].startswith("TrackingStoreError: the MLflow tracking store ")


def test_mlflow_store_that_cannot_be_created_stops_run(workspace, monkeypatch):
    before = snapshot(workspace)
    blocker = workspace.root / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    reads = count_source_reads(monkeypatch)

    with pytest.raises(StageError) as raised:
        nightly_scores(as_of=AS_OF, retrain=False)

    assert reads == []
    assert_run_stopped(
        workspace, before, raised.value, "mlflow",
        f"the MLflow tracking store sqlite:///{blocker}/mlflow.db cannot be created: {blocker} "
        f"is a file, not a folder",
    )


class ExclusiveWriter:
    """Another connection that holds SQLite's write lock on the warehouse."""

    def __init__(self, path: Path):
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.held = False

    def lock(self) -> None:
        if not self.held:
            self.connection.execute("BEGIN EXCLUSIVE")
            self.held = True

    def release(self) -> None:
        if self.held:
            self.connection.execute("ROLLBACK")
            self.held = False

    def close(self) -> None:
        self.release()
        self.connection.close()


def lock_during_publish(monkeypatch, writer: ExclusiveWriter, release_after: float | None):
    """Take the write lock as publish starts; release it after a delay or on the last attempt."""
    publish_scores = publish.publish_scores
    attempts: list[float] = []

    def locked_publish(*args, **kwargs):
        attempts.append(time.monotonic())
        writer.lock()
        if release_after is not None:
            threading.Timer(release_after, writer.release).start()
        try:
            return publish_scores(*args, **kwargs)
        finally:
            if release_after is None and len(attempts) == 3:
                writer.release()

    monkeypatch.setattr(publish, "publish_scores", locked_publish)
    monkeypatch.setattr(publish.publish_scores_task, "retry_delay_seconds", [0.1, 0.1])
    return attempts


def test_publish_waits_for_a_short_lock(workspace, monkeypatch):
    writer = ExclusiveWriter(workspace.warehouse_path)
    attempts = lock_during_publish(monkeypatch, writer, release_after=2.0)
    try:
        started = time.monotonic()
        result = nightly_scores(as_of=AS_OF, retrain=False)
        finished = time.monotonic()
    finally:
        writer.close()

    assert result.status == "succeeded"
    assert len(attempts) == 1
    assert finished - attempts[0] >= 2.0
    assert finished - started < 60
    assert set(workspace.scores()["run_id"]) == {result.run_id}


def test_publish_gives_up_on_a_held_lock(workspace, monkeypatch):
    before = snapshot(workspace)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_LOCK_TIMEOUT_SECONDS", "1")
    writer = ExclusiveWriter(workspace.warehouse_path)
    attempts = lock_during_publish(monkeypatch, writer, release_after=None)
    try:
        with pytest.raises(StageError) as raised:
            nightly_scores(as_of=AS_OF, retrain=False)
    finally:
        writer.close()

    assert len(attempts) == 3
    assert_run_stopped(
        workspace, before, raised.value, "publish",
        "the warehouse is locked by another writer",
        "waited 1 s (warehouse_lock_timeout_seconds) and gave up",
    )
