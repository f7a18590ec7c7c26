"""A test's private warehouse and MLflow store, and helpers to change and read them."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from fulcrum.settings import SOURCE_NAMES

SIMULATION_END = dt.date(2026, 6, 30)
AS_OF = SIMULATION_END + dt.timedelta(days=1)
CUTOFF_TEXT = f"{AS_OF} 00:00:00"

# Small enough for the 2,000-lead company to train both models, and short waits for faults.
TEST_ENVIRONMENT = {
    "FULCRUM_MODEL__MIN_TRAINING_POSITIVES": "10",
    "FULCRUM_MODEL__MIN_VALUE_TRAINING_ROWS": "10",
    "FULCRUM_EXTRACT_RETRY_DELAYS_SECONDS": "[0.2, 0.2, 0.2]",
    "FULCRUM_WAREHOUSE_LOCK_TIMEOUT_SECONDS": "10",
    "FULCRUM_RUN_LOCK_WAIT_SECONDS": "30",
}


@dataclass
class Workspace:
    """One test's warehouse and MLflow store, both SQLite files, and its var folder."""

    root: Path
    artifacts: Path

    @property
    def warehouse_path(self) -> Path:
        return self.root / "warehouse.db"

    @property
    def warehouse_url(self) -> str:
        return f"sqlite:///{self.warehouse_path}"

    @property
    def mlflow_url(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def var_dir(self) -> Path:
        return self.root / "var"

    def environment(self) -> dict[str, str]:
        """The FULCRUM_* variables that point a run at this workspace."""
        return {
            **TEST_ENVIRONMENT,
            "FULCRUM_WAREHOUSE_URL": self.warehouse_url,
            "FULCRUM_MLFLOW_TRACKING_URI": self.mlflow_url,
            "FULCRUM_MLFLOW_ARTIFACT_LOCATION": str(self.artifacts),
            "FULCRUM_VAR_DIR": str(self.var_dir),
        }

    def execute(self, statement: str, **params) -> int:
        """Run one SQL statement on the warehouse and return the rows it changed."""
        engine = sa.create_engine(self.warehouse_url)
        try:
            with engine.begin() as connection:
                return connection.execute(sa.text(statement), params).rowcount
        finally:
            engine.dispose()

    def read(self, query: str, **params) -> pd.DataFrame:
        engine = sa.create_engine(self.warehouse_url)
        try:
            with engine.connect() as connection:
                return pd.read_sql_query(sa.text(query), connection, params=params)
        finally:
            engine.dispose()

    def scores(self) -> pd.DataFrame:
        """Every lead_scores row, ordered by date and lead."""
        return self.read("SELECT * FROM lead_scores ORDER BY as_of, lead_id")

    def runs(self) -> pd.DataFrame:
        """Every score_runs row, oldest first."""
        return self.read("SELECT * FROM score_runs ORDER BY started_at")

    def replace_table(self, name: str, frame: pd.DataFrame) -> None:
        """Replace a source table by ``frame``, without the contract's NOT NULL and keys."""
        engine = sa.create_engine(self.warehouse_url)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
                frame.to_sql(name, connection, index=False)
        finally:
            engine.dispose()


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy a SQLite database, including what is still in its write-ahead log."""
    with sqlite3.connect(source) as origin, sqlite3.connect(target) as copy:
        origin.backup(copy)
    origin.close()
    copy.close()


def postgres_environment(url: str, schema: str) -> dict[str, str]:
    """The FULCRUM_* variables that read the sources from, and write the outputs to, ``schema``."""
    sources = {name: {"table": name, "schema": schema} for name in SOURCE_NAMES}
    return {
        "FULCRUM_WAREHOUSE_URL": url,
        "FULCRUM_OUTPUT_SCHEMA": schema,
        "FULCRUM_SOURCES": json.dumps(sources),
    }


@dataclass
class PostgresWarehouse:
    """A warehouse in one PostgreSQL schema, read and changed through an admin connection."""

    url: str
    schema: str

    def execute(self, statement: str, **params) -> int:
        engine = sa.create_engine(self.url)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(f'SET search_path TO "{self.schema}"'))
                return connection.execute(sa.text(statement), params).rowcount
        finally:
            engine.dispose()

    def read(self, query: str, **params) -> pd.DataFrame:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(f'SET search_path TO "{self.schema}"'))
                return pd.read_sql_query(sa.text(query), connection, params=params)
        finally:
            engine.dispose()
