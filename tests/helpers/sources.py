"""Small hand-written source tables for stage and flow tests."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from fulcrum.contract import define_source_tables
from fulcrum.warehouse import create_engine_for


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def tiny_sources() -> dict[str, pd.DataFrame]:
    """Three leads, one converted into an account with two monthly invoices."""
    leads = pd.DataFrame(
        {
            "lead_id": ["L1", "L2", "L3"],
            "created_at": [ts("2024-01-05 10:00"), ts("2024-02-10 09:30"), ts("2024-03-31 23:59")],
            "channel": ["organic", "referral", None],
            "industry": ["software", "retail", "software"],
            "employees": [50, None, 1200],
            "region": ["emea", "na", "na"],
            "seniority": ["manager", "c_level", None],
            "disqualified_at": [None, None, None],
        }
    )
    events = pd.DataFrame(
        {
            "lead_id": ["L1", "L1", "L2", "L3"],
            "event_type": ["page_view", "demo_request", "page_view", "pricing_page_view"],
            "occurred_at": [ts("2024-01-06"), ts("2024-01-20"), ts("2024-02-11"), ts("2024-04-02")],
        }
    )
    opportunities = pd.DataFrame(
        {
            "opportunity_id": ["O1", "O2"],
            "lead_id": ["L1", "L2"],
            "account_id": ["A1", None],
            "created_at": [ts("2024-01-21"), ts("2024-02-20")],
            "closed_at": [ts("2024-02-01"), ts("2024-04-15")],
            "won": [True, False],
        }
    )
    accounts = pd.DataFrame(
        {
            "account_id": ["A1"],
            "started_at": [ts("2024-02-01")],
            "cancelled_at": [None],
            "plan": ["growth"],
            "currency": ["USD"],
        }
    )
    invoices = pd.DataFrame(
        {
            "invoice_id": ["I1", "I2"],
            "account_id": ["A1", "A1"],
            "period_start": [ts("2024-02-01"), ts("2024-03-01")],
            "period_end": [ts("2024-03-01"), ts("2024-04-01")],
            "issued_at": [ts("2024-02-01"), ts("2024-03-01")],
            "amount": [100.0, 100.0],
            "cost": [20.0, 20.0],
            "currency": ["USD", "USD"],
            "kind": ["charge", "charge"],
        }
    )
    return {
        "leads": leads,
        "lead_events": events,
        "opportunities": opportunities,
        "billing_accounts": accounts,
        "invoices": invoices,
    }


def write_sources(url: str, sources: dict[str, pd.DataFrame]) -> sa.Engine:
    """Create the contract's source tables at ``url`` and insert the given frames."""
    engine = create_engine_for(url)
    metadata = sa.MetaData()
    tables = define_source_tables(metadata)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as connection:
        for name, frame in sources.items():
            records = frame.astype(object).where(frame.notna(), None).to_dict("records")
            for record in records:
                for key, value in record.items():
                    if isinstance(value, pd.Timestamp):
                        record[key] = value.to_pydatetime()
            if records:
                connection.execute(tables[name].insert(), records)
    return engine
