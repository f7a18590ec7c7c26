"""A small scored company to break, and helpers to read what a run left in the warehouse.

``scored_company`` simulates 2,000 leads and runs the nightly flow once with retraining, so
the warehouse contains one good partition and MLflow contains both champions. Each test gets a
private copy of both databases through ``workspace`` and breaks it in its own way.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from fulcrum.simulate import simulate_company
from tests.reliability.workspace import (
    AS_OF,
    SIMULATION_END,
    PostgresWarehouse,
    Workspace,
    copy_sqlite,
    postgres_environment,
)


@pytest.fixture(scope="session")
def scored_company(tmp_path_factory, prefect_api) -> Workspace:
    """A 2,000-lead company scored once as of AS_OF, with both champions in MLflow."""
    from flows.nightly import nightly_scores

    root = tmp_path_factory.mktemp("scored_company")
    template = Workspace(root=root, artifacts=root / "mlartifacts")
    simulate_company(template.warehouse_url, leads=2_000, months=12, seed=7, end=SIMULATION_END)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("FULCRUM_CONFIG", raising=False)
        for key, value in template.environment().items():
            patch.setenv(key, value)
        result = nightly_scores(as_of=AS_OF, retrain=True)
    assert result.status == "succeeded"
    assert result.value_model_version is not None
    return template


@pytest.fixture
def workspace(scored_company, tmp_path, monkeypatch) -> Workspace:
    """A private copy of the scored company, with the run settings pointed at it."""
    copy = Workspace(root=tmp_path, artifacts=scored_company.artifacts)
    copy_sqlite(scored_company.warehouse_path, copy.warehouse_path)
    copy_sqlite(scored_company.root / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    for key, value in copy.environment().items():
        monkeypatch.setenv(key, value)
    return copy


@pytest.fixture
def postgres_schema(postgres_url):
    """A fresh schema in the session's PostgreSQL database, dropped afterwards."""
    name = f"reliability_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        yield name
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture
def postgres_workspace(postgres_url, postgres_schema, scored_company, tmp_path, monkeypatch):
    """The 2,000-lead company in a PostgreSQL schema, with the scored company's champions.

    The output tables go to the same schema. The MLflow store is a copy of the scored
    company's, so runs can score without retraining.
    """
    simulate_company(
        postgres_url, leads=2_000, months=12, seed=7, end=SIMULATION_END, schema=postgres_schema
    )
    workspace = Workspace(root=tmp_path, artifacts=scored_company.artifacts)
    copy_sqlite(scored_company.root / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    environment = {
        **workspace.environment(),
        **postgres_environment(postgres_url, postgres_schema),
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return PostgresWarehouse(postgres_url, postgres_schema)
