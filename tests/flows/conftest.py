"""A temporary Prefect API for flow tests, and a simulated company to run them on."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from fulcrum.simulate import simulate_company

# The simulated company's last day; runs score as of the day after.
SIMULATION_END = dt.date(2026, 6, 30)
AS_OF = SIMULATION_END + dt.timedelta(days=1)


@pytest.fixture(scope="session")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def company_db(tmp_path_factory) -> Path:
    """A simulated company of 8,000 leads over 18 months, written once per test module."""
    path = tmp_path_factory.mktemp("company") / "warehouse.db"
    simulate_company(f"sqlite:///{path}", leads=8_000, months=18, seed=7, end=SIMULATION_END)
    return path


@pytest.fixture
def flow_env(company_db, tmp_path, monkeypatch, prefect_api):
    """Point the flow's settings at a private copy of the company and a fresh MLflow store."""
    warehouse = tmp_path / "warehouse.db"
    warehouse.write_bytes(company_db.read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_URL", f"sqlite:///{warehouse}")
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FULCRUM_MLFLOW_ARTIFACT_LOCATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("FULCRUM_VAR_DIR", str(tmp_path / "var"))
    return tmp_path
