"""The same guarantees on PostgreSQL: time zones, unusual text, a killed connection, reads only.

The stage-level tests write small hand-made tables. The flow tests run the nightly flow on
the simulated company in a schema of its own, with the champions of ``scored_company``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.settings import SOURCE_NAMES, load_settings
from tasks.extract import ExtractError, as_of_cutoff, extract_sources
from tasks.labels import monthly_revenue
from tasks.validate import validate_sources
from tests.reliability.data import (
    UNUSUAL_ACCOUNT_IDS,
    UNUSUAL_LEAD_IDS,
    UNUSUAL_SEGMENT,
    recent_lead_ids,
    rename_leads_and_accounts,
)
from tests.reliability.workspace import AS_OF

MIXED_AS_OF = dt.date(2026, 2, 3)

# 23:30 in New York on 31 January is 04:30 UTC on 1 February.
NEW_YORK_MONTH_END = "2026-01-31T23:30:00-05:00"


def mixed_time_sources() -> dict[str, pd.DataFrame]:
    """One converted lead and its account, with timestamps as text: naive, UTC, and offsets."""
    leads = pd.DataFrame(
        {
            "lead_id": ["L1", "L2", "L3"],
            "created_at": ["2026-01-20 09:00:00", "2026-01-28T08:00:00+01:00", NEW_YORK_MONTH_END],
            "channel": ["organic", "referral", "organic"],
            "industry": ["retail", "software", "retail"],
            "employees": [10, 200, 30],
            "region": ["na", "emea", "na"],
            "seniority": ["ic", "vp", "ic"],
            "disqualified_at": [None, None, None],
        }
    )
    lead_events = pd.DataFrame(
        {
            "lead_id": ["L1", "L2", "L3"],
            "event_type": ["page_view", "demo_request", "page_view"],
            "occurred_at": ["2026-01-20T10:00:00Z", "2026-01-29 12:00:00", NEW_YORK_MONTH_END],
        }
    )
    opportunities = pd.DataFrame(
        {
            "opportunity_id": ["O1"],
            "lead_id": ["L1"],
            "account_id": ["A1"],
            "created_at": ["2026-01-21T10:00:00+00:00"],
            "closed_at": ["2026-01-22 10:00:00"],
            "won": [True],
        }
    )
    billing_accounts = pd.DataFrame(
        {
            "account_id": ["A1"],
            "started_at": ["2026-01-01T00:00:00-05:00"],
            "cancelled_at": [None],
            "plan": ["growth"],
            "currency": ["USD"],
        }
    )
    # Three one-off lines (empty period) at 23:30 on 31 January in three notations, and one
    # month of service that starts and ends at New York midnight.
    invoices = pd.DataFrame(
        {
            "invoice_id": ["I-NY", "I-NAIVE", "I-UTC", "I-PERIOD"],
            "account_id": ["A1"] * 4,
            "period_start": [NEW_YORK_MONTH_END, "2026-01-31 23:30:00", "2026-01-31T23:30:00Z",
                             "2026-01-01T00:00:00-05:00"],
            "period_end": [NEW_YORK_MONTH_END, "2026-01-31 23:30:00", "2026-01-31T23:30:00Z",
                           "2026-02-01T00:00:00-05:00"],
            "issued_at": [NEW_YORK_MONTH_END, "2026-01-31 23:30:00", "2026-01-31T23:30:00Z",
                          "2026-01-01T00:00:00-05:00"],
            "amount": [500.0, 70.0, 11.0, 310.0],
            "cost": [0.0, 0.0, 0.0, 0.0],
            "currency": ["USD"] * 4,
            "kind": ["charge"] * 4,
        }
    )
    return {
        "leads": leads,
        "lead_events": lead_events,
        "opportunities": opportunities,
        "billing_accounts": billing_accounts,
        "invoices": invoices,
    }


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_new_york_month_end_in_next_utc_month(backend, request, settings_factory, tmp_path):
    if backend == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'mixed.db'}", None
    else:
        url, schema = request.getfixturevalue("postgres_url"), request.getfixturevalue("postgres_schema")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        if schema:
            connection.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        for name, frame in mixed_time_sources().items():
            frame.to_sql(name, connection, schema=schema, index=False)
    engine.dispose()
    sources = {name: {"table": name, "schema": schema} for name in SOURCE_NAMES}
    settings = settings_factory(warehouse_url=url, sources=sources)
    cutoff = as_of_cutoff(MIXED_AS_OF, settings.business_timezone)

    frames = extract_sources(settings, MIXED_AS_OF)
    report = validate_sources(frames, MIXED_AS_OF, cutoff, settings, tmp_path / "reports")
    monthly = monthly_revenue(frames.invoices, cutoff)

    assert report.success, [r.describe() for r in report.failures(None)]
    issued = frames.invoices.set_index("invoice_id")["issued_at"]
    assert issued["I-NY"] == pd.Timestamp("2026-02-01 04:30", tz="UTC")
    assert issued["I-NAIVE"] == pd.Timestamp("2026-01-31 23:30", tz="UTC")
    assert issued["I-UTC"] == pd.Timestamp("2026-01-31 23:30", tz="UTC")
    revenue = monthly.set_index("month")["revenue"]
    # The period runs from 05:00 UTC on 1 January to 05:00 UTC on 1 February: 5 of its 744
    # hours fall in February.
    assert revenue[pd.Timestamp("2026-01-01", tz="UTC")] == pytest.approx(70 + 11 + 310 * 739 / 744)
    assert revenue[pd.Timestamp("2026-02-01", tz="UTC")] == pytest.approx(500 + 310 * 5 / 744)
    assert set(revenue.index) == {pd.Timestamp("2026-01-01", tz="UTC"), pd.Timestamp("2026-02-01", tz="UTC")}


@pytest.mark.postgres
def test_nan_amount_on_postgres_stops_validation(postgres_url, postgres_schema, settings_factory, tmp_path):
    engine = sa.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(sa.schema.CreateSchema(postgres_schema))
        for name, frame in mixed_time_sources().items():
            frame.to_sql(name, connection, schema=postgres_schema, index=False)
        # pandas writes NaN as NULL, so the NaN is set in SQL.
        connection.execute(
            sa.text(
                f"UPDATE \"{postgres_schema}\".invoices SET amount = 'NaN'::float8 "
                "WHERE invoice_id = 'I-NAIVE'"
            )
        )
        stored = connection.execute(
            sa.text(f"SELECT amount::text FROM \"{postgres_schema}\".invoices WHERE invoice_id = 'I-NAIVE'")
        ).scalar_one()
    engine.dispose()
    settings = settings_factory(
        warehouse_url=postgres_url,
        sources={name: {"table": name, "schema": postgres_schema} for name in SOURCE_NAMES},
    )
    cutoff = as_of_cutoff(MIXED_AS_OF, settings.business_timezone)

    frames = extract_sources(settings, MIXED_AS_OF)
    report = validate_sources(frames, MIXED_AS_OF, cutoff, settings, tmp_path / "reports")

    assert stored == "NaN"
    messages = [result.describe() for result in report.failures("critical")]
    assert messages == ["invoices.amount: expect_column_values_to_not_be_null failed for 1 of 4 rows"]


@pytest.mark.postgres
def test_sql_mapping_cannot_write_to_warehouse(postgres_workspace, settings_factory, monkeypatch):
    warehouse = postgres_workspace
    monkeypatch.delenv("FULCRUM_SOURCES")
    schema = warehouse.schema
    warehouse.execute("CREATE TABLE kept AS SELECT lead_id FROM leads LIMIT 5")
    # A function that deletes, called from a mapping's SELECT: PostgreSQL runs it only when
    # rows are read, after the mapping's probe has passed.
    warehouse.execute(
        f'CREATE FUNCTION "{schema}".purge() RETURNS integer LANGUAGE sql AS '
        f"$$ DELETE FROM \"{schema}\".kept; SELECT 1 $$"
    )
    sources = {name: {"table": name, "schema": schema} for name in SOURCE_NAMES}
    sources["leads"] = {"sql": f'SELECT l.*, "{schema}".purge() AS purged FROM "{schema}".leads l'}
    settings = settings_factory(warehouse_url=warehouse.url, sources=sources)

    with pytest.raises(ExtractError, match="cannot execute DELETE in a read-only transaction"):
        extract_sources(settings, AS_OF)

    assert warehouse.read("SELECT COUNT(*) AS n FROM kept")["n"].iloc[0] == 5


@pytest.mark.postgres
@pytest.mark.slow
def test_unusual_text_round_trips_on_postgres(postgres_workspace):
    from flows.nightly import nightly_scores

    warehouse = postgres_workspace
    lead_ids = recent_lead_ids(warehouse, len(UNUSUAL_LEAD_IDS))
    account_ids = warehouse.read(
        "SELECT account_id FROM billing_accounts ORDER BY account_id LIMIT 2"
    )["account_id"].tolist()
    rename_leads_and_accounts(warehouse, lead_ids, account_ids)

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    scores = warehouse.read("SELECT lead_id, p_convert FROM lead_scores")
    assert set(UNUSUAL_LEAD_IDS) <= set(scores["lead_id"])
    labels = warehouse.read("SELECT account_id, segment FROM account_ltv")
    stored = dict(zip(labels["account_id"], labels["segment"]))
    for account_id in UNUSUAL_ACCOUNT_IDS:
        assert stored[account_id] == UNUSUAL_SEGMENT
    lengths = warehouse.read(
        "SELECT max(char_length(lead_id)) AS longest FROM lead_scores"
    )["longest"].iloc[0]
    assert lengths == 10_000


class BackendTerminator(threading.Thread):
    """Hold an exclusive lock on the leads table and kill the first backend that waits on it."""

    def __init__(self, url: str, schema: str):
        super().__init__(daemon=True)
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.schema = schema
        self.locker = sa.create_engine(url).connect()
        self.locker.begin()
        self.locker.execute(sa.text(f'LOCK TABLE "{schema}".leads IN ACCESS EXCLUSIVE MODE'))
        self.terminated: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            while not self.terminated and time.monotonic() < deadline:
                with self.engine.connect() as connection:
                    pids = connection.execute(
                        sa.text(
                            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND query ILIKE :pattern"
                        ),
                        {"pattern": f"%FROM {self.schema}.leads%"},
                    ).scalars().all()
                    for pid in pids:
                        connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                        self.terminated.append(pid)
                time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc
        finally:
            self.locker.rollback()
            self.locker.close()
            self.engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_terminated_backend_during_extract_is_retried(postgres_workspace, caplog):
    from flows.nightly import nightly_scores

    warehouse = postgres_workspace
    terminator = BackendTerminator(warehouse.url, warehouse.schema)
    terminator.start()

    with caplog.at_level(logging.WARNING):
        result = nightly_scores(as_of=AS_OF, retrain=False)
    terminator.join(timeout=30)

    assert terminator.error is None
    assert len(terminator.terminated) == 1
    assert result.status == "succeeded"
    assert "reading source leads failed on attempt 1 of 4" in caplog.text
    assert "terminating connection due to administrator command" in caplog.text
    runs = warehouse.read("SELECT status FROM score_runs")
    assert runs["status"].tolist() == ["succeeded"]
    assert len(warehouse.read("SELECT lead_id FROM lead_scores")) == result.leads_scored > 0
