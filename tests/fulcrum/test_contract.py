"""The contract's tables are created on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fulcrum.cli import main
from fulcrum.contract import SOURCES, define_output_tables, define_source_tables


def test_contract_names_key_and_required_columns():
    assert SOURCES["invoices"].key == ("invoice_id",)
    assert SOURCES["opportunities"].required_columns == ["opportunity_id", "lead_id", "created_at"]
    assert SOURCES["leads"].extra_columns_allowed


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_contract_tables_created(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'w.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    define_source_tables(metadata)
    define_output_tables(metadata)
    metadata.drop_all(engine)

    metadata.create_all(engine)

    inspector = sa.inspect(engine)
    names = set(inspector.get_table_names())
    assert set(SOURCES) | {"lead_scores", "account_ltv", "score_runs", "volume_value_frontier"} <= names
    keys = inspector.get_pk_constraint("lead_scores")["constrained_columns"]
    assert keys == ["as_of", "lead_id"]
    metadata.drop_all(engine)
    engine.dispose()


def test_init_db_command_is_idempotent(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'w.db'}"

    assert main(["init-db", "--url", url]) == 0
    first = capsys.readouterr().out
    assert main(["init-db", "--url", url]) == 0
    second = capsys.readouterr().out

    assert "lead_scores" in first
    assert "none (all existed)" in second
