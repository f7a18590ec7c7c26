"""A temporary Prefect API for flow tests, and a simulated company to run them on."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import prefect_api  # noqa: F401 - re-exported for the conftests that import it here

from fulcrum.simulate import simulate_company

# The simulated company's last day; runs score as of the day after.
SIMULATION_END = dt.date(2026, 6, 30)
AS_OF = SIMULATION_END + dt.timedelta(days=1)


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
    # Three training snapshots instead of six keep each training run short; the flow's
    # behaviour under test does not depend on the number.
    monkeypatch.setenv("FULCRUM_MODEL__SNAPSHOT_COUNT", "3")
    return tmp_path


# Training settings that a 3,000-lead company satisfies and that train in seconds: two
# snapshots, two calibration folds and lower minimum counts than the defaults.
FAST_TRAINING_ENV = {
    "FULCRUM_MODEL__SNAPSHOT_COUNT": "2",
    "FULCRUM_MODEL__CALIBRATION_FOLDS": "2",
    "FULCRUM_MODEL__MIN_TRAINING_POSITIVES": "10",
    "FULCRUM_MODEL__MIN_VALUE_TRAINING_ROWS": "10",
}
# The champion of `trained_company` is trained as of this date.
TRAINED_AS_OF = dt.date(2026, 6, 20)


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy a SQLite database with the backup API, so rows still in its WAL file come along."""
    with sqlite3.connect(source) as reader, sqlite3.connect(target) as writer:
        reader.backup(writer)
    reader.close()
    writer.close()


def point_settings_at(monkeypatch: pytest.MonkeyPatch, folder: Path, artifacts: Path) -> None:
    """Point every FULCRUM_* location at ``folder`` and use the fast training settings."""
    monkeypatch.chdir(folder)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_URL", f"sqlite:///{folder / 'warehouse.db'}")
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.setenv("FULCRUM_MLFLOW_ARTIFACT_LOCATION", str(artifacts))
    monkeypatch.setenv("FULCRUM_VAR_DIR", str(folder / "var"))
    for key, value in FAST_TRAINING_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def small_company_db(tmp_path_factory) -> Path:
    """A simulated company of 3,000 leads over 12 months, written once per test module."""
    path = tmp_path_factory.mktemp("small-company") / "warehouse.db"
    simulate_company(f"sqlite:///{path}", leads=3_000, months=12, seed=7, end=SIMULATION_END)
    return path


@pytest.fixture(scope="module")
def trained_company(small_company_db, tmp_path_factory, prefect_api) -> Path:
    """A folder with the small company and an MLflow store whose champions date from TRAINED_AS_OF.

    The nightly run that trained them also left its partition for TRAINED_AS_OF.
    """
    from flows.nightly import nightly_scores

    folder = tmp_path_factory.mktemp("trained")
    copy_sqlite(small_company_db, folder / "warehouse.db")
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_settings_at(monkeypatch, folder, folder / "mlartifacts")
        result = nightly_scores(as_of=TRAINED_AS_OF)
    assert result.conversion_model_version == "1"
    return folder


@pytest.fixture
def trained_env(trained_company, tmp_path, monkeypatch) -> Path:
    """Point the settings at private copies of the trained company's warehouse and registry.

    The copies share the module's MLflow artifact folder, which runs that do not retrain only read.
    """
    for name in ("warehouse.db", "mlflow.db"):
        copy_sqlite(trained_company / name, tmp_path / name)
    point_settings_at(monkeypatch, tmp_path, trained_company / "mlartifacts")
    return tmp_path
