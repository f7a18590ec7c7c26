"""Extract reads each source as it stood at the start of the as-of date."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.warehouse import SourceMappingError
from tasks.extract import ExtractError, as_of_cutoff, extract_sources, to_utc
from tests.helpers.sources import tiny_sources, ts, write_sources


def test_cutoff_is_local_midnight_in_utc():
    assert as_of_cutoff(dt.date(2024, 7, 1), "America/New_York") == ts("2024-07-01 04:00")
    assert as_of_cutoff(dt.date(2024, 1, 1), "America/New_York") == ts("2024-01-01 05:00")
    assert as_of_cutoff(dt.date(2024, 1, 1), "UTC") == ts("2024-01-01 00:00")


def test_extract_drops_rows_created_after_cutoff(settings_factory):
    settings = settings_factory()
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    frames = extract_sources(settings, dt.date(2024, 3, 1))

    assert frames.leads["lead_id"].tolist() == ["L1", "L2"]
    assert frames.lead_events["lead_id"].tolist() == ["L1", "L1", "L2"]
    assert frames.invoices["invoice_id"].tolist() == ["I1"]


def test_extract_hides_outcomes_learned_after_cutoff(settings_factory):
    settings = settings_factory()
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    frames = extract_sources(settings, dt.date(2024, 4, 1))

    lost = frames.opportunities.set_index("opportunity_id").loc["O2"]
    assert pd.isna(lost["closed_at"])
    assert pd.isna(lost["won"])
    won = frames.opportunities.set_index("opportunity_id").loc["O1"]
    assert bool(won["won"]) is True
    assert won["account_id"] == "A1"


def test_extract_timestamps_are_utc_aware(settings_factory):
    settings = settings_factory()
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    frames = extract_sources(settings, dt.date(2024, 5, 1))

    for name, frame in frames.items():
        for column in frame.columns:
            if "datetime" in str(frame[column].dtype):
                assert str(frame[column].dtype) == "datetime64[ns, UTC]", (name, column)
    assert frames.leads.loc[2, "created_at"] == ts("2024-03-31 23:59")


def test_extract_respects_business_timezone(settings_factory):
    # L3 was created 2024-03-31 23:59 UTC, which is 19:59 on March 31 in New York, so it
    # exists at the start of April 1 in New York.
    settings = settings_factory(business_timezone="America/New_York")
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    frames = extract_sources(settings, dt.date(2024, 4, 1))

    assert frames.leads["lead_id"].tolist() == ["L1", "L2", "L3"]


def test_to_utc_parses_naive_and_offset_text():
    values = pd.Series(["2024-01-31 23:30:00", "2024-01-31T23:30:00-05:00", "2024-02-01", None])

    parsed = to_utc(values, "invoices", "issued_at")

    assert parsed.tolist()[:3] == [ts("2024-01-31 23:30"), ts("2024-02-01 04:30"), ts("2024-02-01")]
    assert pd.isna(parsed.iloc[3])


def test_to_utc_names_unparsable_values():
    values = pd.Series(["2024-01-01", "yesterday", "31/02/2024"])

    with pytest.raises(ExtractError, match=r"invoices\.issued_at: 2 value\(s\).*yesterday"):
        to_utc(values, "invoices", "issued_at")


def test_sql_mapping_over_differently_named_tables(settings_factory):
    settings = settings_factory()
    engine = write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE crm_contacts (contact_key TEXT, signup_ts TEXT, src TEXT)"))
        connection.execute(
            sa.text(
                "INSERT INTO crm_contacts VALUES "
                "('C1', '2024-01-02 08:00:00', 'partner'), ('C2', '2024-06-02 08:00:00', 'events')"
            )
        )
    mapped = settings_factory(
        sources={
            "leads": {
                "sql": "SELECT contact_key AS lead_id, signup_ts AS created_at, src AS channel, "
                "NULL AS industry, NULL AS employees, NULL AS region, NULL AS seniority, "
                "NULL AS disqualified_at FROM crm_contacts"
            }
        }
    )

    frames = extract_sources(mapped, dt.date(2024, 3, 1))

    assert frames.leads["lead_id"].tolist() == ["C1"]
    assert frames.leads["channel"].tolist() == ["partner"]
    assert frames.leads["created_at"].tolist() == [ts("2024-01-02 08:00")]


def test_table_mapping_to_missing_table_names_it(settings_factory):
    settings = settings_factory(sources={"leads": {"table": "crm_leads_v2"}})
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    with pytest.raises(SourceMappingError, match="crm_leads_v2.*does not exist"):
        extract_sources(settings, dt.date(2024, 3, 1))


def test_failing_sql_mapping_names_the_source(settings_factory):
    settings = settings_factory(sources={"invoices": {"sql": "SELECT * FROM no_such_billing_table"}})
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    with pytest.raises(SourceMappingError, match="source 'invoices' is mapped to a SQL query that failed"):
        extract_sources(settings, dt.date(2024, 3, 1))


def test_mapping_missing_a_contract_column_names_it(settings_factory):
    settings = settings_factory(
        sources={"lead_events": {"sql": "SELECT lead_id, occurred_at FROM lead_events"}}
    )
    write_sources(settings.warehouse_url.get_secret_value(), tiny_sources())

    with pytest.raises(SourceMappingError, match=r"lacks required column\(s\) \['event_type'\]"):
        extract_sources(settings, dt.date(2024, 3, 1))


@pytest.mark.postgres
def test_extract_on_postgres_matches_sqlite(settings_factory, postgres_url):
    sqlite_settings = settings_factory()
    write_sources(sqlite_settings.warehouse_url.get_secret_value(), tiny_sources())
    pg_settings = settings_factory(warehouse_url=postgres_url)
    write_sources(postgres_url, tiny_sources())

    expected = extract_sources(sqlite_settings, dt.date(2024, 4, 1))
    actual = extract_sources(pg_settings, dt.date(2024, 4, 1))

    for name, frame in expected.items():
        other = dict(actual.items())[name]
        assert other.shape == frame.shape, name
        contract_columns = [c for c in frame.columns if c in other.columns]
        pd.testing.assert_frame_equal(
            other[contract_columns].astype(str), frame[contract_columns].astype(str), obj=name
        )
