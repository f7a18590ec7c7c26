"""Publish replaces one date's partition atomically and keeps an audit row per run."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.warehouse import Warehouse, create_engine_for
from tasks import publish
from tasks.publish import publish_scores, record_run_end, record_run_start

AS_OF = dt.date(2024, 4, 1)


def score_rows(lead_ids: list[str], p: float = 0.5) -> pd.DataFrame:
    count = len(lead_ids)
    return pd.DataFrame(
        {
            "lead_id": lead_ids,
            "p_convert": [p] * count,
            "predicted_ltv": [1000.0] * count,
            "expected_value": [p * 1000.0] * count,
            "overlay_weight": [0.5] * count,
            "overlay_score": [0.1] * count,
            "rank_volume": list(range(1, count + 1)),
            "rank_value": list(range(1, count + 1)),
            "rank_expected_value": list(range(1, count + 1)),
            "rank_overlay": list(range(1, count + 1)),
            "route": ["nurture"] * count,
            "conversion_model_version": ["1"] * count,
            "value_model_version": [None] * count,
        }
    )


def ltv_rows(account_ids: list[str]) -> pd.DataFrame:
    count = len(account_ids)
    return pd.DataFrame(
        {
            "account_id": account_ids,
            "segment": ["growth"] * count,
            "currency": ["USD"] * count,
            "months_billed": [2.0] * count,
            "revenue": [200.0] * count,
            "cost": [40.0] * count,
            "arpu": [100.0] * count,
            "gross_margin": [0.8] * count,
            "churn_rate": [0.02] * count,
            "expected_lifetime_months": [50.0] * count,
            "ltv": [4000.0] * count,
            "is_active": [True] * count,
        }
    )


def frontier_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "overlay_weight": [0.0, 0.5, 1.0],
            "capacity": [2, 2, 2],
            "expected_conversions": [1.0, 0.9, 0.5],
            "expected_value": [500.0, 700.0, 900.0],
        }
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def warehouse(request, tmp_path) -> Warehouse:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'out.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    warehouse = Warehouse(engine=create_engine_for(url))
    warehouse.metadata.drop_all(warehouse.engine)
    warehouse.create_output_tables()
    return warehouse


def read_table(warehouse: Warehouse, name: str) -> pd.DataFrame:
    with warehouse.engine.connect() as connection:
        return pd.read_sql_query(sa.select(warehouse.outputs[name]), connection)


def test_create_output_tables_is_idempotent(warehouse):
    assert warehouse.create_output_tables() == []
    names = set(sa.inspect(warehouse.engine).get_table_names())
    assert {"lead_scores", "account_ltv", "score_runs", "volume_value_frontier"} <= names


def test_publish_same_date_twice_leaves_one_copy(warehouse):
    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    publish_scores(warehouse, AS_OF, "run-2", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())

    scores = read_table(warehouse, "lead_scores")
    assert sorted(scores["lead_id"]) == ["L1", "L2"]
    assert set(scores["run_id"]) == {"run-2"}
    assert len(read_table(warehouse, "account_ltv")) == 1
    assert len(read_table(warehouse, "volume_value_frontier")) == 3


def test_publish_keeps_other_dates(warehouse):
    publish_scores(warehouse, AS_OF, "run-1", score_rows(["L1"]), ltv_rows(["A1"]), frontier_rows())
    later = AS_OF + dt.timedelta(days=1)
    publish_scores(warehouse, later, "run-2", score_rows(["L1", "L9"]), ltv_rows([]), frontier_rows())

    scores = read_table(warehouse, "lead_scores")
    counts = scores.groupby(scores["as_of"].astype(str)).size().to_dict()
    assert counts == {"2024-04-01": 1, "2024-04-02": 2}


def test_failure_while_writing_keeps_previous_partition(warehouse, monkeypatch):
    publish_scores(warehouse, AS_OF, "good", score_rows(["L1", "L2"]), ltv_rows(["A1"]), frontier_rows())
    original = publish.replace_partition

    def fail_on_frontier(connection, table, as_of, frame):
        written = original(connection, table, as_of, frame)
        if table.name == "volume_value_frontier":
            raise ConnectionError("connection dropped while writing")
        return written

    monkeypatch.setattr(publish, "replace_partition", fail_on_frontier)
    with pytest.raises(ConnectionError):
        publish_scores(warehouse, AS_OF, "bad", score_rows(["L7"]), ltv_rows(["A7"]), frontier_rows())

    scores = read_table(warehouse, "lead_scores")
    assert sorted(scores["lead_id"]) == ["L1", "L2"]
    assert set(scores["run_id"]) == {"good"}
    assert read_table(warehouse, "account_ltv")["account_id"].tolist() == ["A1"]


def test_publish_writes_more_rows_than_sqlite_variable_limit(warehouse, monkeypatch):
    monkeypatch.setattr(publish, "INSERT_BATCH_ROWS", 7_000)
    lead_ids = [f"L{i:06d}" for i in range(40_000)]

    counts = publish_scores(warehouse, AS_OF, "big", score_rows(lead_ids), ltv_rows([]), frontier_rows())

    assert counts["lead_scores"] == 40_000
    assert len(read_table(warehouse, "lead_scores")) == 40_000


def test_run_audit_row_records_failure(warehouse):
    record_run_start(warehouse, "run-9", "flow-1", "nightly-scores", AS_OF)
    record_run_end(warehouse, "run-9", "failed", failed_stage="validate", message="x" * 10_000,
                   validation_summary={"success": False})

    runs = read_table(warehouse, "score_runs")
    row = runs.iloc[0]
    assert row["status"] == "failed"
    assert row["failed_stage"] == "validate"
    assert len(row["message"]) == publish.MESSAGE_MAX_CHARS
    assert row["validation_summary"] == '{"success": false}'
    assert row["finished_at"] is not None
