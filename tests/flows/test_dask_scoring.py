"""Scoring chunks on a Dask cluster gives the same scores as scoring in the flow's process."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest

from flows.nightly import nightly_scores
from tests.flows.conftest import AS_OF

distributed = pytest.importorskip("distributed", reason="needs the 'dask' extra")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dask_address():
    """A Dask scheduler on loopback with one worker of two threads, in this process."""
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


def read_scores(folder) -> pd.DataFrame:
    with sqlite3.connect(folder / "warehouse.db") as connection:
        frame = pd.read_sql_query(
            "SELECT lead_id, p_convert, predicted_ltv, rank_overlay, route FROM lead_scores "
            "WHERE as_of = ? ORDER BY lead_id",
            connection,
            params=[AS_OF.isoformat()],
        )
    connection.close()
    return frame


def test_dask_scores_equal_local_scores(trained_env, monkeypatch, dask_address):
    monkeypatch.setenv("FULCRUM_CHUNK_ROWS", "1000")
    local = nightly_scores(as_of=AS_OF, retrain=False)
    local_scores = read_scores(trained_env)

    monkeypatch.setenv("FULCRUM_DASK_ADDRESS", dask_address)
    on_dask = nightly_scores(as_of=AS_OF, retrain=False)
    dask_scores = read_scores(trained_env)

    assert on_dask.status == "succeeded"
    assert on_dask.leads_scored == local.leads_scored
    assert local.leads_scored > 1000
    pd.testing.assert_frame_equal(dask_scores, local_scores)


def test_dask_runs_one_task_per_chunk(trained_env, monkeypatch, dask_address, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    monkeypatch.setenv("FULCRUM_CHUNK_ROWS", "1000")
    monkeypatch.setenv("FULCRUM_DASK_ADDRESS", dask_address)
    result = nightly_scores(as_of=AS_OF, retrain=False)

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result.flow_run_id]))
        )
    chunk_runs = [run for run in task_runs if run.name.startswith("predict-chunk")]
    assert len(chunk_runs) == -(-result.leads_scored // 1000)
    assert {run.state_type.value for run in chunk_runs} == {"COMPLETED"}
