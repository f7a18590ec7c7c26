"""The audit rows and output tables: abandoned runs, and tables made by earlier versions."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys

import pytest
import sqlalchemy as sa

from fulcrum.contract import current_process_identity
from fulcrum.warehouse import Warehouse, abandonment_reason, create_engine_for
from tasks.publish import record_run_start

NOW = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.timezone.utc)
STALE_AFTER = dt.timedelta(hours=24)


def ended_process_identity() -> str:
    """The identity of a process on this host that has already exited."""
    child = subprocess.run(
        [sys.executable, "-c", "from fulcrum.contract import current_process_identity as c; print(c())"],
        capture_output=True, text=True, check=True,
    )
    return child.stdout.strip()


def test_ended_process_makes_run_abandoned():
    identity = ended_process_identity()

    reason = abandonment_reason(identity, NOW, NOW, STALE_AFTER)

    pid = identity.split(":")[1]
    assert reason == f"process {pid} on host {socket.gethostname()} is no longer running"


def test_live_process_keeps_recent_run():
    assert abandonment_reason(current_process_identity(), NOW, NOW, STALE_AFTER) is None


def test_reused_pid_counts_as_ended():
    host, pid, start = current_process_identity().split(":")
    if not start:
        pytest.skip("process start times come from /proc, which this system lacks")

    reason = abandonment_reason(f"{host}:{pid}:{int(start) - 1}", NOW, NOW, STALE_AFTER)

    assert reason is not None


def test_other_host_waits_for_stale_age():
    recent = NOW - dt.timedelta(hours=23)
    old = NOW - dt.timedelta(hours=25)

    assert abandonment_reason("elsewhere:123:456", recent, NOW, STALE_AFTER) is None
    reason = abandonment_reason("elsewhere:123:456", old, NOW, STALE_AFTER)
    assert reason == (
        "it started 25.0 hours ago, more than stale_run_after_hours, and its process "
        "elsewhere:123:456 cannot be checked from this host"
    )


def test_row_without_process_waits_for_stale_age():
    naive_old = (NOW - dt.timedelta(hours=30)).replace(tzinfo=None)

    reason = abandonment_reason(None, naive_old, NOW, STALE_AFTER)

    assert "process (not recorded) cannot be checked" in reason


def test_old_score_runs_table_gains_process_column(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE score_runs (run_id VARCHAR(64) PRIMARY KEY, flow_run_id VARCHAR(64), "
            "flow_name VARCHAR(64) NOT NULL, as_of DATE NOT NULL, started_at DATETIME NOT NULL, "
            "finished_at DATETIME, status VARCHAR(16) NOT NULL, failed_stage VARCHAR(32), "
            "message TEXT, leads_scored INTEGER, accounts_labelled INTEGER, "
            "conversion_model_version VARCHAR(64), value_model_version VARCHAR(64), "
            "validation_summary TEXT, metrics TEXT)"
        )
    warehouse = Warehouse(engine=engine)

    created = warehouse.create_output_tables()
    record_run_start(warehouse, "run-1", None, "nightly-scores", dt.date(2026, 7, 1))

    assert "score_runs" not in created
    columns = {column["name"] for column in sa.inspect(engine).get_columns("score_runs")}
    assert "process" in columns
    with engine.connect() as connection:
        process = connection.execute(sa.text("SELECT process FROM score_runs")).scalar_one()
    assert process == current_process_identity()
    assert process.split(":")[1] == str(os.getpid())


@pytest.mark.postgres
def test_varchar_ids_widened_on_postgres(postgres_url, postgres_schema):
    engine = create_engine_for(postgres_url)
    Warehouse(engine=engine, schema=postgres_schema).create_output_tables()
    # The tables as an earlier version made them: ids VARCHAR(255), no process column.
    with engine.begin() as connection:
        for table, column in (("lead_scores", "lead_id"), ("account_ltv", "account_id")):
            connection.exec_driver_sql(
                f"ALTER TABLE {postgres_schema}.{table} ALTER COLUMN {column} TYPE VARCHAR(255)"
            )
        connection.exec_driver_sql(f"ALTER TABLE {postgres_schema}.score_runs DROP COLUMN process")

    Warehouse(engine=engine, schema=postgres_schema).create_output_tables()

    inspector = sa.inspect(engine)
    scores = {c["name"]: c["type"] for c in inspector.get_columns("lead_scores", schema=postgres_schema)}
    labels = {c["name"]: c["type"] for c in inspector.get_columns("account_ltv", schema=postgres_schema)}
    runs = {c["name"] for c in inspector.get_columns("score_runs", schema=postgres_schema)}
    assert isinstance(scores["lead_id"], sa.Text)
    assert isinstance(labels["account_id"], sa.Text)
    assert "process" in runs
    engine.dispose()
