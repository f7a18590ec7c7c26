"""Fixtures for the dataset loaders: small warehouses of real rows, and a Prefect API.

Tests read the public files from ``../shared/data`` at run time (the ``shared_data``
fixture) and select a few rows by id. No data file or copied row lives in the repository.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import pytest

from fulcrum.datasets.common import GeneratedConfig, SqlDialect, write_raw_tables
from fulcrum.warehouse import create_engine_for
from tasks.extract import SourceFrames, extract_sources

# The flow tests' temporary Prefect API, reused for the end-to-end runs on real data.
from tests.flows.conftest import prefect_api  # noqa: F401

BuildConfig = Callable[[SqlDialect], GeneratedConfig]


@pytest.fixture
def extract_through_mapping(settings_factory) -> Callable[..., SourceFrames]:
    """Return a function that lands raw frames in SQLite and reads the sources as the flow does.

    The function takes the raw frames, the config builder and an as-of date, and returns
    the extracted `SourceFrames`. ``url`` sends the raw tables to another warehouse.
    """

    def extract(
        raw_tables: Mapping[str, pd.DataFrame],
        build_config: BuildConfig,
        as_of: dt.date,
        url: str | None = None,
    ) -> SourceFrames:
        settings = settings_factory()
        url = url or settings.warehouse_url.get_secret_value()
        engine = create_engine_for(url)
        try:
            write_raw_tables(engine, raw_tables)
            config = build_config(SqlDialect.for_engine(engine))
            settings = settings_factory(**config.overrides(), warehouse_url=url)
            return extract_sources(settings, as_of, engine=engine)
        finally:
            engine.dispose()

    return extract


@pytest.fixture
def flow_settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api) -> Path:
    """Point a flow run at ``tmp_path``: config file, MLflow store and reports all live there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FULCRUM_CONFIG", str(tmp_path / "fulcrum.toml"))
    monkeypatch.setenv("FULCRUM_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FULCRUM_MLFLOW_ARTIFACT_LOCATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("FULCRUM_VAR_DIR", str(tmp_path / "var"))
    for name in ("FULCRUM_WAREHOUSE_URL", "FULCRUM_SOURCES"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def rows_by_id(frame: pd.DataFrame, column: str, ids: list[str]) -> pd.DataFrame:
    """Return the rows of ``frame`` whose ``column`` is one of ``ids``, failing if one is absent."""
    rows = frame.loc[frame[column].isin(ids)]
    missing = sorted(set(ids) - set(rows[column]))
    assert not missing, f"ids {missing} are not in the {column} column of the real file"
    return rows.reset_index(drop=True)
