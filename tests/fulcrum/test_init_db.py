"""`fulcrum init-db` creates the output tables and marks abandoned runs failed."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
import sqlalchemy as sa

from fulcrum.cli import main
from fulcrum.contract import current_process_identity
from fulcrum.warehouse import ABANDONED_RUN_MESSAGE, Warehouse, create_engine_for


def ended_process_identity() -> str:
    """The ``host:pid:start`` of a process on this host that has already exited."""
    child = subprocess.run(
        [sys.executable, "-c", "import fulcrum.contract as c; print(c.current_process_identity())"],
        capture_output=True, text=True, check=True,
    )
    return child.stdout.strip()


@pytest.fixture
def warehouse_url(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    monkeypatch.delenv("FULCRUM_STALE_RUN_AFTER_HOURS", raising=False)
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


def insert_running(url: str, run_id: str, process: str, hours_ago: float) -> None:
    """Insert a score_runs row left 'running' by ``process``, started ``hours_ago`` ago."""
    engine = create_engine_for(url)
    warehouse = Warehouse(engine=engine)
    warehouse.create_output_tables()
    started_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)
    with engine.begin() as connection:
        connection.execute(
            warehouse.outputs["score_runs"].insert().values(
                run_id=run_id, flow_name="nightly-scores", as_of=dt.date(2026, 7, 1),
                started_at=started_at, status="running", process=process,
            )
        )
    engine.dispose()


def read_statuses(url: str) -> dict[str, tuple[str, str | None]]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT run_id, status, message FROM score_runs")).all()
    engine.dispose()
    return {run_id: (status, message) for run_id, status, message in rows}


def test_init_db_reports_no_abandoned_runs(warehouse_url, capsys):
    assert main(["init-db", "--url", warehouse_url]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "Abandoned runs marked failed in score_runs: 0"


def test_init_db_marks_ended_process_failed(warehouse_url, capsys):
    ended = ended_process_identity()
    insert_running(warehouse_url, "killed-run", ended, hours_ago=0.5)
    insert_running(warehouse_url, "live-run", current_process_identity(), hours_ago=0.5)

    assert main(["init-db", "--url", warehouse_url]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "Abandoned runs marked failed in score_runs: 1 (killed-run)"
    statuses = read_statuses(warehouse_url)
    status, message = statuses["killed-run"]
    assert status == "failed"
    host, pid, _ = ended.split(":")
    assert message == (
        f"{ABANDONED_RUN_MESSAGE}: process {pid} on host {host} is no longer running. "
        f"It published nothing, so the previous scores stay in place"
    )
    assert statuses["live-run"] == ("running", None)


@pytest.mark.parametrize(
    ("stale_run_after_hours", "expected_line"),
    [
        (None, "Abandoned runs marked failed in score_runs: 0"),
        ("1", "Abandoned runs marked failed in score_runs: 1 (remote-run)"),
    ],
)
def test_init_db_uses_stale_run_after_hours(
    warehouse_url, capsys, monkeypatch, stale_run_after_hours, expected_line
):
    # A process on another host cannot be checked, so only its age can mark it abandoned.
    insert_running(warehouse_url, "remote-run", "another-host:123:456", hours_ago=2)
    if stale_run_after_hours is not None:
        monkeypatch.setenv("FULCRUM_STALE_RUN_AFTER_HOURS", stale_run_after_hours)

    assert main(["init-db", "--url", warehouse_url]) == 0

    assert capsys.readouterr().out.splitlines()[-1] == expected_line
    expected_status = "running" if stale_run_after_hours is None else "failed"
    assert read_statuses(warehouse_url)["remote-run"][0] == expected_status


def test_init_db_lists_marked_runs_sorted(warehouse_url, capsys):
    for run_id in ("run-c", "run-a", "run-b"):
        insert_running(warehouse_url, run_id, ended_process_identity(), hours_ago=0.5)

    assert main(["init-db", "--url", warehouse_url]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "Abandoned runs marked failed in score_runs: 3 (run-a, run-b, run-c)"
