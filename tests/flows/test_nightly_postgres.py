"""The nightly flow on PostgreSQL: the same company gives the same outputs as on SQLite."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from flows.nightly import StageError, nightly_scores
from fulcrum.simulate import simulate_company
from tests.flows.conftest import FAST_TRAINING_ENV

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SIMULATION_END = dt.date(2026, 6, 30)
AS_OF = SIMULATION_END + dt.timedelta(days=1)
SOURCE_SCHEMA = "crm_billing"
OUTPUT_SCHEMA = "scores"
SOURCES = ("leads", "lead_events", "opportunities", "billing_accounts", "invoices")


@pytest.fixture(scope="module")
def warehouses(postgres_url, tmp_path_factory) -> dict[str, str]:
    """The same 3,000-lead company in a SQLite file and in a PostgreSQL schema."""
    folder = tmp_path_factory.mktemp("same-company")
    sqlite_url = f"sqlite:///{folder / 'warehouse.db'}"
    simulate_company(sqlite_url, leads=3_000, months=12, seed=11, end=SIMULATION_END)
    engine = sa.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SOURCE_SCHEMA} CASCADE")
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {OUTPUT_SCHEMA} CASCADE")
    engine.dispose()
    simulate_company(
        postgres_url, leads=3_000, months=12, seed=11, end=SIMULATION_END, schema=SOURCE_SCHEMA
    )
    return {"sqlite": sqlite_url, "postgresql": postgres_url}


def point_at(monkeypatch, folder, url: str, backend: str) -> None:
    monkeypatch.chdir(folder)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_URL", url)
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.setenv("FULCRUM_MLFLOW_ARTIFACT_LOCATION", str(folder / "mlartifacts"))
    monkeypatch.setenv("FULCRUM_VAR_DIR", str(folder / "var"))
    for key, value in FAST_TRAINING_ENV.items():
        monkeypatch.setenv(key, value)
    if backend == "postgresql":
        monkeypatch.setenv("FULCRUM_OUTPUT_SCHEMA", OUTPUT_SCHEMA)
        for source in SOURCES:
            monkeypatch.setenv(f"FULCRUM_SOURCES__{source.upper()}__TABLE", source)
            monkeypatch.setenv(f"FULCRUM_SOURCES__{source.upper()}__SCHEMA", SOURCE_SCHEMA)


def read(url: str, query: str, **params) -> pd.DataFrame:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return pd.read_sql_query(sa.text(query), connection, params=params)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def runs(warehouses, tmp_path_factory, prefect_api) -> dict[str, object]:
    """One nightly run per backend, as of the same date, each with its own MLflow store."""
    results = {}
    for backend, url in warehouses.items():
        with pytest.MonkeyPatch.context() as monkeypatch:
            folder = tmp_path_factory.mktemp(f"run-{backend}")
            point_at(monkeypatch, folder, url, backend)
            results[backend] = nightly_scores(as_of=AS_OF)
    return results


def test_postgres_run_succeeds(runs):
    result = runs["postgresql"]

    assert result.status == "succeeded"
    assert result.leads_scored > 0
    assert result.rows_published["lead_scores"] == result.leads_scored
    assert result.rows_published["volume_value_frontier"] == 11


def test_same_leads_scored_on_both(runs, warehouses):
    sqlite_scores = read(warehouses["sqlite"], "SELECT lead_id FROM lead_scores ORDER BY lead_id")
    postgres_scores = read(
        warehouses["postgresql"], f"SELECT lead_id FROM {OUTPUT_SCHEMA}.lead_scores"
    )

    assert sorted(postgres_scores["lead_id"]) == sorted(sqlite_scores["lead_id"])
    assert runs["postgresql"].leads_scored == runs["sqlite"].leads_scored


def test_same_labels_on_both(runs, warehouses):
    columns = "account_id, segment, currency, months_billed, revenue, cost, arpu, ltv, is_active"
    sqlite_labels = read(
        warehouses["sqlite"], f"SELECT {columns} FROM account_ltv ORDER BY account_id"
    )
    postgres_labels = read(
        warehouses["postgresql"],
        f"SELECT {columns} FROM {OUTPUT_SCHEMA}.account_ltv ORDER BY account_id",
    )

    assert postgres_labels["account_id"].tolist() == sqlite_labels["account_id"].tolist()
    assert postgres_labels["segment"].tolist() == sqlite_labels["segment"].tolist()
    assert postgres_labels["is_active"].astype(bool).tolist() == sqlite_labels["is_active"].astype(bool).tolist()
    for column in ("months_billed", "revenue", "cost", "arpu", "ltv"):
        np.testing.assert_allclose(
            postgres_labels[column].to_numpy(dtype=float),
            sqlite_labels[column].to_numpy(dtype=float),
            rtol=1e-9,
            err_msg=column,
        )


def test_same_model_metrics_on_both(runs):
    sqlite_metrics = runs["sqlite"].metrics
    postgres_metrics = runs["postgresql"].metrics

    assert postgres_metrics["conversion"]["roc_auc"] == pytest.approx(
        sqlite_metrics["conversion"]["roc_auc"], abs=1e-9
    )
    assert postgres_metrics["value"]["spearman"] == pytest.approx(
        sqlite_metrics["value"]["spearman"], abs=1e-9
    )


def test_failed_run_keeps_postgres_scores(runs, warehouses, tmp_path, monkeypatch):
    url = warehouses["postgresql"]
    before = read(url, f"SELECT lead_id, p_convert, run_id FROM {OUTPUT_SCHEMA}.lead_scores ORDER BY lead_id")
    point_at(monkeypatch, tmp_path, url, "postgresql")
    # A mapping whose SQL fails stops the run in extract, before anything is written.
    monkeypatch.delenv("FULCRUM_SOURCES__INVOICES__TABLE")
    monkeypatch.delenv("FULCRUM_SOURCES__INVOICES__SCHEMA")
    monkeypatch.setenv("FULCRUM_SOURCES__INVOICES__SQL", "SELECT * FROM crm_billing.no_such_table")

    with pytest.raises(StageError, match="extract"):
        nightly_scores(as_of=AS_OF, retrain=False)

    after = read(url, f"SELECT lead_id, p_convert, run_id FROM {OUTPUT_SCHEMA}.lead_scores ORDER BY lead_id")
    pd.testing.assert_frame_equal(before, after)
    statuses = read(url, f"SELECT status FROM {OUTPUT_SCHEMA}.score_runs ORDER BY started_at")
    assert statuses["status"].tolist() == ["succeeded", "failed"]
