"""Shared loader steps: text-preserving CSV reads, dialect SQL, and the generated config."""

from __future__ import annotations

import datetime as dt
import tomllib

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.datasets.common import (
    ConfigEntry,
    DatasetFileError,
    GeneratedConfig,
    SourceMapping,
    SqlDialect,
    dedent_sql,
    locate_file,
    read_csv_as_text,
    warehouse_entry,
    write_raw_tables,
)
from fulcrum.settings import SOURCE_NAMES, Settings
from fulcrum.warehouse import create_engine_for


TRAILING_COMMA_CSV = b"id,zip,total,\r\na,05,\" \",\r\nb,,12.5,\r\n"


def test_csv_read_keeps_text_values(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(TRAILING_COMMA_CSV)

    frame = read_csv_as_text(path)

    assert frame["zip"].tolist() == ["05", ""]
    assert frame["total"].tolist() == [" ", "12.5"]


def test_csv_read_drops_trailing_comma_column(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(TRAILING_COMMA_CSV)

    frame = read_csv_as_text(path)

    assert list(frame.columns) == ["id", "zip", "total"]


def test_csv_read_keeps_named_empty_column(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("id,note\na,\nb,\n")

    frame = read_csv_as_text(path)

    assert list(frame.columns) == ["id", "note"]


def test_locate_file_both_folder_levels(tmp_path):
    (tmp_path / "telco").mkdir()
    (tmp_path / "telco" / "data.csv").write_text("a\n1\n")

    assert locate_file(tmp_path, "telco", "data.csv") == tmp_path / "telco" / "data.csv"
    assert locate_file(tmp_path / "telco", "telco", "data.csv") == tmp_path / "telco" / "data.csv"
    with pytest.raises(DatasetFileError, match=r"'other.csv' not found.*folder that contains telco/"):
        locate_file(tmp_path, "telco", "other.csv")


def test_dialect_rejects_unsupported_backend():
    with pytest.raises(ValueError, match=r"written for \['sqlite', 'postgresql'\]. Got the dialect 'mysql'"):
        SqlDialect("mysql")


def _dialect_values(url: str) -> dict:
    engine = create_engine_for(url)
    write_raw_tables(engine, {"raw_values": pd.DataFrame({"day": ["2018-02-01"], "amount": [" "], "n": ["3"]})})
    dialect = SqlDialect.for_engine(engine)
    start = dialect.timestamp_literal(dt.date(2024, 1, 1))
    query = f"""
        SELECT
            {dialect.timestamp("day")} AS midnight,
            {dialect.add_days(dialect.timestamp("day"), 30)} AS plus_30_days,
            {dialect.add_seconds(start, "90")} AS plus_90_seconds,
            {dialect.add_months(start, "-" + dialect.integer("n"))} AS minus_3_months,
            {dialect.number("amount")} AS blank_amount,
            {dialect.number("n")} AS three
        FROM raw_values
    """
    with engine.connect() as connection:
        row = connection.execute(sa.text(query)).mappings().one()
    engine.dispose()
    # SQLite returns timestamps as ISO text and PostgreSQL as datetime objects.
    timestamps = ("midnight", "plus_30_days", "plus_90_seconds", "minus_3_months")
    return {key: str(pd.Timestamp(value)) if key in timestamps else value for key, value in row.items()}


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_dialect_fragments_give_same_values(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'w.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")

    values = _dialect_values(url)

    assert values == {
        "midnight": "2018-02-01 00:00:00",
        "plus_30_days": "2018-03-03 00:00:00",
        "plus_90_seconds": "2024-01-01 00:01:30",
        "minus_3_months": "2023-10-01 00:00:00",
        "blank_amount": None,
        "three": 3.0,
    }


def _config(**sql) -> GeneratedConfig:
    sources = [SourceMapping(name, sql.get(name)) for name in SOURCE_NAMES]
    return GeneratedConfig(
        "demo",
        "A demo config.\nSecond line.",
        settings=[ConfigEntry("freshness_days", 30, "Quiet CRM.")],
        sections={"ltv": [ConfigEntry("churn_grace_days", 0, "Monthly billing.")]},
        sources=sources,
    )


def test_rendered_config_reads_back_as_settings(tmp_path, monkeypatch):
    config = _config(
        leads="SELECT 'a' AS lead_id WHERE 1 = 1 AND '' = ''",
        opportunities="SELECT 1 AS opportunity_id",
    )
    path = tmp_path / "fulcrum.toml"
    path.write_text(config.render())
    monkeypatch.setenv("FULCRUM_CONFIG", str(path))

    settings = Settings()

    assert tomllib.loads(path.read_text())["ltv"] == {"churn_grace_days": 0}
    assert settings.freshness_days == 30
    assert settings.sources["leads"].sql == "SELECT 'a' AS lead_id WHERE 1 = 1 AND '' = ''"
    assert settings.sources["lead_events"].absent
    assert not settings.has_billing
    assert "# Quiet CRM.\nfreshness_days = 30" in path.read_text()


def test_config_needs_all_five_sources():
    with pytest.raises(ValueError, match="maps exactly the sources"):
        GeneratedConfig("demo", "", sources=[SourceMapping("leads", None)])


def test_config_rejects_sql_with_triple_quote():
    config = _config(leads="SELECT '''' AS lead_id", opportunities="SELECT 1")

    with pytest.raises(ValueError, match="three single quotes"):
        config.render()


def test_password_url_is_not_written():
    assert warehouse_entry("postgresql://scorer:secret@127.0.0.1/dw") is None
    assert warehouse_entry("sqlite:///var/olist.db").value == "sqlite:///var/olist.db"


def test_dedent_sql_strips_common_indentation():
    assert dedent_sql("\n    SELECT 1\n      FROM t\n") == "SELECT 1\n  FROM t"
