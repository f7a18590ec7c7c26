"""Identifiers from the settings are checked before anything runs.

A table or schema name must be a plain identifier. A name such as
``leads; drop table lead_scores`` is rejected when the settings are resolved: the CLI exits
with status 2 and a message naming the setting, no score_runs row is written and no table
is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import get_current_settings
from pydantic import ValidationError

from flows.nightly import nightly_scores
from tests.reliability.workspace import AS_OF

REPOSITORY = Path(__file__).resolve().parents[2]

UNSAFE_SETTINGS = {
    "source table": (
        "FULCRUM_SOURCES",
        json.dumps({"leads": {"table": "leads; drop table lead_scores"}}),
        "source table name must be a plain SQL identifier",
    ),
    "source schema": (
        "FULCRUM_SOURCES",
        json.dumps({"invoices": {"table": "invoices", "schema": "billing; drop table x"}}),
        "source schema name must be a plain SQL identifier",
    ),
    "output schema": (
        "FULCRUM_OUTPUT_SCHEMA",
        'analytics"; drop table lead_scores; --',
        "output_schema must be a plain SQL identifier",
    ),
    "segment column": (
        "FULCRUM_LTV__SEGMENT_COLUMN",
        "plan) from billing_accounts; --",
        "ltv.segment_column must be a plain SQL identifier",
    ),
}


def warehouse_fingerprint(path: Path) -> str:
    """A hash of the warehouse file, so that any write shows."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["source table", "output schema"])
def test_cli_rejects_unsafe_identifier_before_running(workspace, setting):
    variable, value, message = UNSAFE_SETTINGS[setting]
    runs_before = workspace.runs()
    fingerprint = warehouse_fingerprint(workspace.warehouse_path)
    environment = {
        **os.environ,
        **workspace.environment(),
        variable: value,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "PYTHONPATH": str(REPOSITORY),
    }

    finished = subprocess.run(
        [sys.executable, "-m", "fulcrum.cli", "run", "--as-of", AS_OF.isoformat()],
        cwd=workspace.root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert finished.returncode == 2, finished.stderr[-2000:]
    assert "fulcrum: invalid settings" in finished.stderr
    assert message in finished.stderr
    assert warehouse_fingerprint(workspace.warehouse_path) == fingerprint
    assert workspace.runs().equals(runs_before)


@pytest.mark.parametrize("setting", sorted(UNSAFE_SETTINGS))
def test_flow_rejects_unsafe_identifier(workspace, monkeypatch, setting):
    variable, value, message = UNSAFE_SETTINGS[setting]
    fingerprint = warehouse_fingerprint(workspace.warehouse_path)
    monkeypatch.setenv(variable, value)

    with pytest.raises(ValidationError, match=message):
        nightly_scores(as_of=AS_OF, retrain=False)

    assert warehouse_fingerprint(workspace.warehouse_path) == fingerprint
