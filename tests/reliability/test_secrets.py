"""Credentials stay out of logs, errors, MLflow, Prefect artifacts and score_runs.

The warehouse is a PostgreSQL schema owned by a role created for the test, whose password is
a random canary. The warehouse URL, password included, comes from a Prefect Secret block,
and the MLflow store is a PostgreSQL database reached with the same password. One run
retrains and succeeds, a second stops in validation, and then every place a run writes text
to is searched for the canary.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from mlflow import MlflowClient
from pydantic import ValidationError
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogWorker
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from flows.nightly import StageError, nightly_scores
from fulcrum.settings import Settings, load_settings
from fulcrum.simulate import simulate_company
from tests.reliability.workspace import (
    AS_OF,
    SIMULATION_END,
    TEST_ENVIRONMENT,
    PostgresWarehouse,
    postgres_environment,
)



@pytest.fixture
def canary_role(postgres_url):
    """A PostgreSQL role with a random password, owning a schema and an MLflow database.

    Yields (warehouse URL, MLflow URL, schema, password). The local server trusts loopback
    connections, so the password is accepted whatever it is; the test only needs it in URLs.
    """
    token = uuid.uuid4().hex[:8]
    password = f"S3cr3t-Canary-{token}"
    role = f"fulcrum_secret_user_{token}"
    schema = f"secrets_{token}"
    mlflow_database = f"fulcrum_mlflow_{token}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        # The names and password are made of letters, digits, '_' and '-' generated above.
        connection.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        connection.execute(sa.text(f"CREATE SCHEMA {schema} AUTHORIZATION {role}"))
        # CREATE SCHEMA IF NOT EXISTS needs the privilege even when the schema exists.
        database = sa.engine.make_url(postgres_url).database
        connection.execute(sa.text(f'GRANT CREATE ON DATABASE "{database}" TO {role}'))
        connection.execute(sa.text(f"CREATE DATABASE {mlflow_database} OWNER {role}"))
    base = sa.engine.make_url(postgres_url).set(username=role, password=password)
    warehouse_url = base.render_as_string(hide_password=False)
    mlflow_url = base.set(database=mlflow_database).render_as_string(hide_password=False)
    try:
        yield warehouse_url, mlflow_url, schema, password
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {mlflow_database} WITH (FORCE)"))
            connection.execute(sa.text(f"DROP OWNED BY {role}"))
            connection.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_password_never_leaves_the_settings(canary_role, prefect_api, tmp_path, monkeypatch, caplog):
    warehouse_url, mlflow_url, schema, password = canary_role
    simulate_company(warehouse_url, leads=2_000, months=12, seed=7, end=SIMULATION_END, schema=schema)
    block_name = f"fulcrum-warehouse-{uuid.uuid4().hex[:8]}"
    Secret(value=warehouse_url).save(block_name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    environment = {
        **TEST_ENVIRONMENT,
        **postgres_environment(warehouse_url, schema),
        "FULCRUM_WAREHOUSE_URL_SECRET_BLOCK": block_name,
        "FULCRUM_MLFLOW_TRACKING_URI": mlflow_url,
        "FULCRUM_MLFLOW_ARTIFACT_LOCATION": str(tmp_path / "mlartifacts"),
        "FULCRUM_VAR_DIR": str(tmp_path / "var"),
    }
    del environment["FULCRUM_WAREHOUSE_URL"]
    monkeypatch.delenv("FULCRUM_WAREHOUSE_URL", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    warehouse = PostgresWarehouse(warehouse_url, schema)

    with caplog.at_level(logging.DEBUG):
        good = nightly_scores(as_of=AS_OF, retrain=True)
        warehouse.execute(
            "INSERT INTO invoices VALUES ('INV-ORPHAN', 'A-MISSING', '2026-06-01', '2026-07-01', "
            "'2026-06-01', 10.0, 1.0, 'USD', 'charge')"
        )
        with pytest.raises(StageError) as raised:
            nightly_scores(as_of=AS_OF, retrain=False)

    assert good.status == "succeeded"
    owner = warehouse.read(
        "SELECT tableowner FROM pg_tables WHERE schemaname = :schema AND tablename = 'score_runs'",
        schema=schema,
    )["tableowner"].iloc[0]
    assert owner == sa.engine.make_url(warehouse_url).username

    runs = warehouse.read("SELECT * FROM score_runs ORDER BY started_at")
    assert runs["status"].tolist() == ["succeeded", "failed"]
    places = {
        "captured log records": captured_logs(caplog),
        "exception": exception_text(raised.value),
        "score_runs": [str(value) for value in runs.to_numpy().ravel() if value is not None],
        "Prefect": prefect_texts([str(value) for value in runs["flow_run_id"]]),
        "MLflow": mlflow_texts(mlflow_url),
        "files under the run folder": file_texts(tmp_path),
    }

    for place, texts in places.items():
        assert texts, f"nothing was collected from {place}"
        leaks = [text[:300] for text in texts if password in text]
        assert not leaks, f"the password appears in {place}: {leaks[:3]}"
    assert len(places["Prefect"]) > 50
    assert any("validate" in text for text in places["exception"])


def captured_logs(caplog) -> list[str]:
    texts = [caplog.text]
    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    return texts


def exception_text(error: BaseException) -> list[str]:
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


def prefect_texts(flow_run_ids: list[str]) -> list[str]:
    """Logs, parameters, state messages and artifacts of the flow runs and their task runs."""
    ids = [uuid.UUID(flow_run_id) for flow_run_id in flow_run_ids]
    texts = []
    # Run logs reach the API through a background worker, so send what is queued first.
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=offset
            )
            texts += [log.message for log in logs]
            if len(logs) < 200:
                break
            offset += 200
        for flow_run_id in ids:
            flow_run = client.read_flow_run(flow_run_id)
            texts += [str(flow_run.parameters), str(flow_run.state.message), flow_run.name]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        texts += [f"{run.name} {run.state.message} {run.task_inputs}" for run in task_runs]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        texts += [f"{artifact.data} {artifact.description}" for artifact in artifacts]
    assert artifacts, "the successful run created no Prefect artifact"
    return texts


def mlflow_texts(tracking_uri: str) -> list[str]:
    """Params, tags and metric names of every MLflow run, and the registered versions' tags."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    texts = []
    experiments = client.search_experiments()
    for run in client.search_runs([experiment.experiment_id for experiment in experiments]):
        texts += [f"{key}={value}" for key, value in run.data.params.items()]
        texts += [f"{key}={value}" for key, value in run.data.tags.items()]
        texts += list(run.data.metrics)
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            texts += [f"{key}={value}" for key, value in version.tags.items()]
            texts.append(str(version.description))
    texts += [experiment.artifact_location for experiment in experiments]
    return texts


def file_texts(folder: Path) -> list[str]:
    """The text of every file a run wrote under ``folder``: reports, MLflow artifacts."""
    return [
        path.read_bytes().decode("utf-8", errors="replace")
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def test_warehouse_url_read_from_secret_block(prefect_api, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_WAREHOUSE_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'from-block.db'}"
    block_name = f"fulcrum-warehouse-{uuid.uuid4().hex[:8]}"
    Secret(value=url).save(block_name)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_URL_SECRET_BLOCK", block_name)

    settings = load_settings()

    assert settings.warehouse_url.get_secret_value() == url
    assert settings.redacted()["warehouse_url_secret_block"] == block_name


def test_missing_secret_block_is_named(prefect_api, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_WAREHOUSE_URL", raising=False)

    with pytest.raises(ValidationError, match="names the Prefect Secret block 'no-such-block', which could not be read"):
        Settings(warehouse_url_secret_block="no-such-block")


def test_url_and_secret_block_together_are_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValidationError, match="set either warehouse_url or warehouse_url_secret_block") as raised:
        Settings(
            warehouse_url="postgresql+psycopg://scorer:Canary-Pw-1@127.0.0.1/crm",
            warehouse_url_secret_block="fulcrum-warehouse",
        )

    assert "Canary-Pw-1" not in str(raised.value)


def test_password_in_http_tracking_uri_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValidationError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") as raised:
        Settings(mlflow_tracking_uri="http://ml:Canary-Pw-2@127.0.0.1:5000")

    assert "Canary-Pw-2" not in str(raised.value)
    assert "http://ml:***@127.0.0.1:5000" in str(raised.value)
