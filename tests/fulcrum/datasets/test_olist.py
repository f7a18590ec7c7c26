"""Olist mappings on real rows: funnel quirks, commission invoices, churn and censoring."""

from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.contract import LEADS
from fulcrum.datasets import olist
from fulcrum.datasets.common import write_raw_tables
from fulcrum.datasets.olist import OlistAssumptions, build_config, load_olist, read_raw_tables
from fulcrum.settings import LtvSettings
from tasks.extract import as_of_cutoff
from tasks.features import first_conversions, open_leads_at
from tasks.labels import coverage_spells, label_accounts
from tests.fulcrum.datasets.conftest import rows_by_id

# Real ids, each chosen for one quirk of the files.
MQL_BLANK_ORIGIN = "8e952443b19bfc5d0b90e6c4eabcb8fb"
MQL_UNKNOWN_ORIGIN = "c534e2f89539e866011e1e75adfefbfb"
MQL_WON_BEFORE_CONTACT = "b91cf8812365f50ff4bda4bcd6206b05"  # contact 2018-03-08, won 2018-03-06
MQL_WON_AFTER_WINDOW = "20fcec0873b39b4df3df34140d77d6e7"  # won 2018-11-14, the last deal
MQL_TWO_PROFILES = "58caf27a48e7930aefd5437298d64a70"  # profile 'cat, wolf', stock '5-20'
MQL_STOCK_200_PLUS = "1e2a84cd1c6fcd7b7a07f49f1cf7f6cc"
MQL_REVENUE_50M = "6a10f542e6f79265c34a405dbc928e37"
MQL_NEVER_SOLD = "a555fb36b9368110ede0f043dfc3b9a0"  # won 2018-05-08, no order item
MQL_WON_IN_AUGUST = "680fd12be44eee12aee2a2e023438a5d"  # won 2018-08-07, one sale 2018-08-24
MQL_LAPSED = "c18171305e73faabfa61d61c41a420ae"  # one sale, shipping limit 2018-04-19 02:11:31
MQL_REGULAR = "d4db78e389387c2d6f0b5404cbc61fc5"  # 13 items in 9 orders, 2018-06-14 to 08-23
SELLER_NEVER_SOLD = "bbb7d7893a450660432ea6652310ebb7"
SELLER_WON_IN_AUGUST = "535bf14f36346c7f59d87cece104d70c"
SELLER_LAPSED = "0b1ca3ef18a63d7eb0c8897fa0849c08"
SELLER_REGULAR = "7210cd29727d674c00741e5e387b3ccd"
EXTRACT_MQLS = [
    MQL_BLANK_ORIGIN, MQL_UNKNOWN_ORIGIN, MQL_WON_BEFORE_CONTACT, MQL_WON_AFTER_WINDOW,
    MQL_TWO_PROFILES, MQL_STOCK_200_PLUS, MQL_REVENUE_50M, MQL_NEVER_SOLD, MQL_WON_IN_AUGUST,
    MQL_LAPSED, MQL_REGULAR,
]
BACKFILL_END = dt.date(2018, 9, 1)


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


@functools.cache
def _raw_tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    return read_raw_tables(data_dir)


@pytest.fixture
def olist_extract(shared_data) -> dict[str, pd.DataFrame]:
    """The raw rows of the chosen MQLs, their deals and their sellers' order items."""
    raw = _raw_tables(shared_data)
    deals = rows_by_id(raw[olist.RAW_CLOSED_DEALS], "mql_id", [
        mql for mql in EXTRACT_MQLS if mql not in (MQL_BLANK_ORIGIN, MQL_UNKNOWN_ORIGIN)
    ])
    items = raw[olist.RAW_ORDER_ITEMS]
    return {
        olist.RAW_MQL: rows_by_id(raw[olist.RAW_MQL], "mql_id", EXTRACT_MQLS),
        olist.RAW_CLOSED_DEALS: deals,
        olist.RAW_ORDER_ITEMS: items.loc[items["seller_id"].isin(deals["seller_id"])].reset_index(drop=True),
    }


def build(assumptions: OlistAssumptions = OlistAssumptions()):
    return lambda dialect: build_config(dialect, assumptions)


def by_id(frame: pd.DataFrame, column: str, value: str) -> pd.Series:
    rows = frame.loc[frame[column] == value]
    assert len(rows) == 1, f"expected one row with {column} = {value}, found {len(rows)}"
    return rows.iloc[0]


@pytest.mark.realdata
def test_raw_tables_keep_file_text(olist_extract, tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'raw.db'}")
    write_raw_tables(engine, olist_extract)

    with engine.connect() as connection:
        deals = pd.read_sql_table(olist.RAW_CLOSED_DEALS, connection).set_index("mql_id")
        won_type = connection.execute(
            sa.text(f"SELECT typeof(won_date) FROM {olist.RAW_CLOSED_DEALS} LIMIT 1")
        ).scalar_one()
    engine.dispose()

    assert won_type == "text"
    assert deals.loc[MQL_TWO_PROFILES, "lead_behaviour_profile"] == "cat, wolf"
    assert deals.loc[MQL_TWO_PROFILES, "average_stock"] == "5-20"
    assert deals.loc[MQL_STOCK_200_PLUS, "average_stock"] == "200+"
    assert deals.loc[MQL_REVENUE_50M, "declared_monthly_revenue"] == "50000000.0"
    assert deals.loc[MQL_NEVER_SOLD, "has_company"] == ""


@pytest.mark.realdata
def test_origin_blank_null_unknown_kept(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)

    assert pd.isna(by_id(frames.leads, "lead_id", MQL_BLANK_ORIGIN)["channel"])
    assert by_id(frames.leads, "lead_id", MQL_UNKNOWN_ORIGIN)["channel"] == "unknown"


@pytest.mark.realdata
def test_deal_attributes_are_not_lead_columns(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)

    assert list(frames.leads.columns) == LEADS.column_names + ["landing_page_id"]
    assert frames.leads["landing_page_id"].notna().all()


@pytest.mark.realdata
def test_text_dates_become_utc_timestamps(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), dt.date(2019, 1, 1))

    lead = by_id(frames.leads, "lead_id", MQL_UNKNOWN_ORIGIN)
    deal = by_id(frames.opportunities, "opportunity_id", MQL_WON_AFTER_WINDOW)
    assert lead["created_at"] == ts("2018-01-24 00:00:00")
    assert deal["closed_at"] == ts("2018-11-14 18:04:19")
    assert str(frames.opportunities["closed_at"].dtype) == "datetime64[ns, UTC]"


@pytest.mark.realdata
def test_deal_won_before_contact_opens_when_won(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)

    deal = by_id(frames.opportunities, "opportunity_id", MQL_WON_BEFORE_CONTACT)
    lead = by_id(frames.leads, "lead_id", MQL_WON_BEFORE_CONTACT)
    assert deal["created_at"] == deal["closed_at"] == ts("2018-03-06 19:38:55")
    assert lead["created_at"] == ts("2018-03-08 00:00:00")
    assert bool(deal["won"])


@pytest.mark.realdata
def test_late_deal_open_at_cutoff(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)
    cutoff = as_of_cutoff(BACKFILL_END, "UTC")

    deal = by_id(frames.opportunities, "opportunity_id", MQL_WON_AFTER_WINDOW)
    open_leads = open_leads_at(frames.leads, first_conversions(frames.opportunities), cutoff)
    assert pd.isna(deal["closed_at"])
    assert pd.isna(deal["won"])
    assert MQL_WON_AFTER_WINDOW in set(open_leads["lead_id"])
    assert MQL_WON_BEFORE_CONTACT not in set(open_leads["lead_id"])
    assert by_id(frames.opportunities, "opportunity_id", MQL_REVENUE_50M)["won"] is pd.NA


@pytest.mark.realdata
def test_commission_invoice_per_order_and_seller(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)

    invoices = frames.invoices.loc[frames.invoices["account_id"] == SELLER_REGULAR]
    four_items = by_id(invoices, "invoice_id", f"00526a9d4ebde463baee25f386963ddc-{SELLER_REGULAR}")
    assert len(invoices) == 9
    assert four_items["amount"] == pytest.approx(0.10 * 4 * 33.89)
    assert four_items["cost"] == pytest.approx(0.30 * 0.10 * 4 * 33.89)
    assert four_items["issued_at"] == four_items["period_start"] == ts("2018-08-14 22:15:22")
    assert four_items["period_end"] == ts("2018-09-13 22:15:22")
    assert set(frames.invoices["currency"]) == {"BRL"}


@pytest.mark.realdata
def test_seller_who_never_sold_has_no_ltv(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)
    cutoff = as_of_cutoff(BACKFILL_END, "UTC")

    labels = label_accounts(frames.billing_accounts, frames.invoices, cutoff, LtvSettings(churn_grace_days=30))

    account = by_id(labels, "account_id", SELLER_NEVER_SOLD)
    assert account["months_billed"] == 0
    assert pd.isna(account["arpu"])
    assert pd.isna(account["ltv"])
    assert not account["is_active"]
    assert pd.isna(by_id(frames.billing_accounts, "account_id", SELLER_NEVER_SOLD)["cancelled_at"])


@pytest.mark.realdata
def test_seller_won_in_august_is_censored(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), BACKFILL_END)
    cutoff = as_of_cutoff(BACKFILL_END, "UTC")

    spells = coverage_spells(frames.invoices, cutoff, grace_days=30).set_index("account_id")
    account = by_id(frames.billing_accounts, "account_id", SELLER_WON_IN_AUGUST)
    assert spells.loc[SELLER_WON_IN_AUGUST, "active"]
    assert not spells.loc[SELLER_WON_IN_AUGUST, "churned"]
    assert pd.isna(account["cancelled_at"])
    assert account["plan"] == "home_decor"


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("as_of", "churned"),
    [(dt.date(2018, 6, 18), False), (dt.date(2018, 6, 19), True)],
)
def test_seller_churns_after_60_days(as_of, churned, olist_extract, extract_through_mapping):
    # The only sale's coverage ends 2018-05-19 02:11:31, and 30 more days of grace end on 06-18.
    frames = extract_through_mapping(olist_extract, build(), as_of)

    spells = coverage_spells(frames.invoices, as_of_cutoff(as_of, "UTC"), grace_days=30)

    spell = by_id(spells, "account_id", SELLER_LAPSED)
    assert spell["end"] == ts("2018-05-19 02:11:31")
    assert bool(spell["churned"]) is churned
    assert bool(spell["active"]) is not churned


@pytest.mark.realdata
def test_cancelled_at_needs_full_churn_period(olist_extract, extract_through_mapping):
    frames = extract_through_mapping(olist_extract, build(), dt.date(2019, 1, 1))

    accounts = frames.billing_accounts.set_index("account_id")
    assert accounts.loc[SELLER_LAPSED, "cancelled_at"] == ts("2018-05-19 02:11:31")
    assert pd.isna(accounts.loc[SELLER_REGULAR, "cancelled_at"])


@pytest.mark.realdata
def test_items_from_sales_end_are_not_billed(olist_extract, extract_through_mapping):
    assumptions = OlistAssumptions(sales_end=dt.date(2018, 8, 20))
    frames = extract_through_mapping(olist_extract, build(assumptions), dt.date(2019, 1, 1))

    invoices = frames.invoices.loc[frames.invoices["account_id"] == SELLER_REGULAR]
    assert invoices["issued_at"].max() == ts("2018-08-15 03:30:15")
    assert len(invoices) == 8
    assert assumptions.all_sellers_churned_from == dt.date(2018, 10, 19)


@pytest.mark.realdata
def test_items_dated_2020_belong_to_no_won_seller(shared_data):
    raw = _raw_tables(shared_data)
    items = raw[olist.RAW_ORDER_ITEMS]

    outliers = items.loc[items["shipping_limit_date"] >= ts("2020-01-01")]

    assert len(outliers) == 4
    assert not outliers["seller_id"].isin(raw[olist.RAW_CLOSED_DEALS]["seller_id"]).any()


@pytest.mark.realdata
@pytest.mark.postgres
def test_postgresql_mapping_matches_sqlite(olist_extract, extract_through_mapping, postgres_url):
    on_sqlite = extract_through_mapping(olist_extract, build(), BACKFILL_END)
    on_postgres = extract_through_mapping(olist_extract, build(), BACKFILL_END, url=postgres_url)

    for name in ("leads", "opportunities", "billing_accounts", "invoices"):
        key = getattr(on_sqlite, name).columns[0]
        expected = getattr(on_sqlite, name).sort_values(key).reset_index(drop=True)
        actual = getattr(on_postgres, name).sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(
            actual.astype(object), expected.astype(object), check_exact=False, rtol=1e-12, obj=name
        )


def test_assumptions_are_checked():
    with pytest.raises(ValueError, match=r"commission_rate must be in \(0, 1\]. Got 0.0."):
        OlistAssumptions(commission_rate=0.0)
    with pytest.raises(ValueError, match="churn_months must be an integer from 1 to 24. Got 0."):
        OlistAssumptions(churn_months=0)
    assert OlistAssumptions(churn_months=3).churn_grace_days == 60


@pytest.mark.realdata
@pytest.mark.slow
def test_nightly_run_on_loaded_olist(shared_data, flow_settings_env, monkeypatch):
    from flows.nightly import nightly_scores

    url = f"sqlite:///{flow_settings_env / 'olist.db'}"
    result = load_olist(shared_data, url)
    (flow_settings_env / "fulcrum.toml").write_text(result.config.render())
    # Two training snapshots instead of six keep the run short. The doc reports six.
    monkeypatch.setenv("FULCRUM_MODEL__SNAPSHOT_COUNT", "2")

    run = nightly_scores(as_of=BACKFILL_END)

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        open_leads = connection.execute(sa.text(
            "SELECT COUNT(*) FROM olist_raw_mql AS mql WHERE mql.first_contact_date < '2018-09-01' "
            "AND NOT EXISTS (SELECT 1 FROM olist_raw_closed_deals AS deal "
            "WHERE deal.mql_id = mql.mql_id AND deal.won_date < '2018-09-01')"
        )).scalar_one()
        won_sellers = connection.execute(sa.text(
            "SELECT COUNT(*) FROM olist_raw_closed_deals WHERE won_date < '2018-09-01'"
        )).scalar_one()
        scores = pd.read_sql_table("lead_scores", connection)
        summary = json.loads(connection.execute(sa.text("SELECT validation_summary FROM score_runs")).scalar_one())
    engine.dispose()
    assert run.status == "succeeded"
    assert result.source_rows == {
        "leads": 8000, "lead_events": None, "opportunities": 842, "billing_accounts": 842, "invoices": 4510,
    }
    assert run.leads_scored == len(scores) == open_leads
    assert run.accounts_labelled == won_sellers
    assert summary["success"] is True
    assert run.value_model_version is not None
    assert scores["predicted_ltv"].gt(0).all()
    assert scores["p_convert"].between(0, 1).all()
    assert len(run.frontier) == 11
