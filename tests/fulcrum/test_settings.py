"""Settings resolve from overrides, environment and TOML, and never show a password."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fulcrum.settings import Settings, SourceSpec, load_settings, redact_url


def test_defaults_point_under_var(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FULCRUM_CONFIG", raising=False)

    settings = load_settings()

    assert settings.warehouse_url.get_secret_value() == "sqlite:///var/warehouse.db"
    assert settings.mlflow_tracking_uri.get_secret_value() == "sqlite:///var/mlflow.db"
    assert settings.sources["leads"].table == "leads"


def test_environment_overrides_toml(monkeypatch, tmp_path):
    config = tmp_path / "custom.toml"
    config.write_text('horizon_days = 45\noverlay_weight = 0.25\n[ltv]\nlifetime_cap_months = 36\n')
    monkeypatch.setenv("FULCRUM_CONFIG", str(config))
    monkeypatch.setenv("FULCRUM_OVERLAY_WEIGHT", "0.75")

    settings = load_settings()

    assert settings.horizon_days == 45
    assert settings.overlay_weight == 0.75
    assert settings.ltv.lifetime_cap_months == 36


def test_nested_environment_variable(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FULCRUM_MODEL__MIN_TRAINING_POSITIVES", "7")

    assert load_settings().model.min_training_positives == 7


def test_settings_are_read_at_call_time_not_import(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FULCRUM_HORIZON_DAYS", "30")
    first = load_settings()
    monkeypatch.setenv("FULCRUM_HORIZON_DAYS", "60")

    assert (first.horizon_days, load_settings().horizon_days) == (30, 60)


def test_password_never_printed(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings(
        warehouse_url="postgresql://scorer:Pa55-w0rd-XYZ@db.internal:5432/crm",
        mlflow_tracking_uri="postgresql://ml:Pa55-w0rd-XYZ@db.internal/mlflow",
    )

    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert "Pa55-w0rd-XYZ" not in text
    assert settings.redacted()["warehouse_url"] == "postgresql://scorer:***@db.internal:5432/crm"


def test_redact_url_without_password_is_unchanged():
    assert redact_url("sqlite:///var/warehouse.db") == "sqlite:///var/warehouse.db"


@pytest.mark.parametrize(
    "table",
    ["leads; drop table lead_scores", "crm.leads", "leads--", "1leads", "x" * 64, "lead scores"],
)
def test_unsafe_table_names_are_rejected(table):
    with pytest.raises(ValidationError, match="must be a plain SQL identifier"):
        SourceSpec(table=table)


def test_sql_mapping_must_be_one_select():
    with pytest.raises(ValidationError, match="single statement"):
        SourceSpec(sql="SELECT * FROM a; DELETE FROM lead_scores")
    with pytest.raises(ValidationError, match="one SELECT"):
        SourceSpec(sql="DELETE FROM lead_scores")


def test_mapping_needs_exactly_one_of_table_or_sql():
    with pytest.raises(ValidationError, match="exactly one of 'table' or 'sql'"):
        SourceSpec(table="leads", sql="SELECT 1")


def test_unknown_source_name_is_rejected(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match=r"unknown names \['contacts'\]"):
        Settings(sources={"contacts": {"table": "contacts"}})


def test_partial_mapping_keeps_default_tables(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings(sources={"leads": {"table": "crm_leads", "schema": "raw"}})

    assert settings.sources["leads"].table == "crm_leads"
    assert settings.sources["leads"].schema_name == "raw"
    assert settings.sources["invoices"].table == "invoices"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("business_timezone", "Mars/Olympus", "IANA zone name"),
        ("overlay_weight", 1.5, "less than or equal to 1"),
        ("currencies", ["usd"], "ISO 4217"),
        ("output_schema", "scores; drop", "plain SQL identifier"),
    ],
)
def test_invalid_values_are_rejected(monkeypatch, tmp_path, field, value, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_absent_sources_must_come_in_pairs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="absent together"):
        Settings(sources={"invoices": {"absent": True}})

    settings = Settings(sources={"invoices": {"absent": True}, "billing_accounts": {"absent": True}})

    assert settings.has_crm
    assert not settings.has_billing
