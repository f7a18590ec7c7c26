"""Shared fixtures: telemetry off, throwaway SQLite warehouses and a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

# Telemetry and update checks are switched off before Prefect, MLflow or GX is imported,
# because test machines reach no host but package registries.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import pytest
import sqlalchemy as sa

# The public datasets are never copied into the repository. By default they sit in the
# shared/data folder beside the repository's folder, as on CI machines.
SHARED_DATA = Path(
    os.environ.get("FULCRUM_DATASETS_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
DEFAULT_TEST_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


@pytest.fixture
def settings_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Build Settings whose files all live under the test's temporary folder."""
    from fulcrum.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)

    def make(**overrides) -> Settings:
        values = {
            "warehouse_url": f"sqlite:///{tmp_path / 'warehouse.db'}",
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow_artifact_location": str(tmp_path / "mlartifacts"),
            "var_dir": tmp_path / "var",
        }
        values.update(overrides)
        return Settings(**values)

    return make


def _postgres_admin_url() -> str:
    return os.environ.get("FULCRUM_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES)


@pytest.fixture(scope="session")
def postgres_url():
    """Create a fresh PostgreSQL database for this test session and drop it afterwards."""
    admin_url = sa.engine.make_url(_postgres_admin_url())
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL at {admin_url.render_as_string()} is not reachable: {exc.orig}")
    name = f"fulcrum_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def shared_data() -> Path:
    """The public datasets folder; skipped outside CI when it is absent."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the shared datasets folder {SHARED_DATA} is missing in CI")
        pytest.skip(f"the shared datasets folder {SHARED_DATA} is absent")
    return SHARED_DATA


_harness = {"users": 0, "context": None}


@pytest.fixture(scope="session")
def prefect_api():
    """Start one temporary Prefect API per test process and share it.

    Conftest files in several folders re-export this fixture, and pytest then keeps one
    session fixture per folder. The count makes them share a single server.
    """
    from prefect.testing.utilities import prefect_test_harness

    if _harness["users"] == 0:
        context = prefect_test_harness(server_startup_timeout=180)
        context.__enter__()
        _harness["context"] = context
    _harness["users"] += 1
    try:
        yield
    finally:
        _harness["users"] -= 1
        if _harness["users"] == 0:
            _harness["context"].__exit__(None, None, None)
