"""Telco mappings on real rows: invoices rebuilt from tenure, blank TotalCharges, churn labels."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.datasets import telco
from fulcrum.datasets.telco import TelcoAssumptions, build_config, load_telco, read_raw_tables
from fulcrum.settings import LtvSettings
from tasks.extract import as_of_cutoff
from tasks.labels import coverage_spells, label_accounts
from tests.fulcrum.datasets.conftest import rows_by_id

pytestmark = pytest.mark.realdata

# Real customer ids, each chosen for one quirk of the file.
NEW_CUSTOMER = "4472-LVYGI"  # tenure 0, TotalCharges ' ', stays
CHURNED = "3668-QPYBK"  # tenure 2, MonthlyCharges 53.85, TotalCharges 108.15, churned
STAYING = "5575-GNVDE"  # tenure 34, MonthlyCharges 56.95, TotalCharges 1889.5, One year
DUPLICATE_PAIR = ["9728-FTTVZ", "7660-HDPJV"]  # equal in every column but customerID
EXTRACT_IDS = [NEW_CUSTOMER, CHURNED, STAYING, *DUPLICATE_PAIR]
ASSUMPTIONS = TelcoAssumptions()
GRACE = LtvSettings(churn_grace_days=0, churn_prior_months=0)


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


@functools.cache
def _raw_customers(data_dir: Path) -> pd.DataFrame:
    return read_raw_tables(data_dir)[telco.RAW_CUSTOMERS]


@pytest.fixture
def telco_extract(shared_data) -> dict[str, pd.DataFrame]:
    return {telco.RAW_CUSTOMERS: rows_by_id(_raw_customers(shared_data), "customerID", EXTRACT_IDS)}


@pytest.fixture
def frames(telco_extract, extract_through_mapping):
    """The chosen customers through the mapping, as of the day after the reference date."""
    return extract_through_mapping(
        telco_extract, lambda dialect: build_config(dialect, ASSUMPTIONS), ASSUMPTIONS.as_of
    )


def invoices_of(frames, customer: str) -> pd.DataFrame:
    invoices = frames.invoices.loc[frames.invoices["account_id"] == customer]
    return invoices.sort_values("period_start").reset_index(drop=True)


def test_total_charges_blank_for_new_customer(telco_extract):
    customer = rows_by_id(telco_extract[telco.RAW_CUSTOMERS], "customerID", [NEW_CUSTOMER]).iloc[0]

    assert customer["TotalCharges"] == " "
    assert customer["tenure"] == "0"


def test_new_customer_is_billed_only_for_next_month(frames):
    invoices = invoices_of(frames, NEW_CUSTOMER)
    account = frames.billing_accounts.set_index("account_id").loc[NEW_CUSTOMER]

    assert invoices["invoice_id"].tolist() == [f"{NEW_CUSTOMER}-0"]
    assert invoices["amount"].tolist() == [52.55]
    assert invoices["period_start"].tolist() == [ts("2024-01-01")]
    assert invoices["period_end"].tolist() == [ts("2024-02-01")]
    assert account["started_at"] == ts("2024-01-01")


def test_churned_customer_ends_at_reference(frames):
    invoices = invoices_of(frames, CHURNED)
    account = frames.billing_accounts.set_index("account_id").loc[CHURNED]

    assert invoices["period_start"].tolist() == [ts("2023-11-01"), ts("2023-12-01")]
    assert invoices["period_end"].tolist() == [ts("2023-12-01"), ts("2024-01-01")]
    assert invoices["amount"].tolist() == pytest.approx([108.15 / 2] * 2)
    assert (invoices["issued_at"] == invoices["period_start"]).all()
    assert account["started_at"] == ts("2023-11-01")
    assert account["cancelled_at"] == ts("2024-01-01")
    assert account["plan"] == "Month-to-month"


def test_staying_customer_billed_next_month(frames):
    invoices = invoices_of(frames, STAYING)

    assert len(invoices) == 35
    assert invoices["period_start"].iloc[0] == ts("2021-03-01")
    assert invoices["period_end"].iloc[-1] == ts("2024-02-01")
    assert invoices["amount"].iloc[-1] == 56.95
    assert invoices["amount"].iloc[:-1].sum() == pytest.approx(1889.5)
    assert pd.isna(frames.billing_accounts.set_index("account_id").loc[STAYING, "cancelled_at"])


def test_labels_count_churn_day_after(frames):
    cutoff = as_of_cutoff(ASSUMPTIONS.as_of, "UTC")

    spells = coverage_spells(frames.invoices, cutoff, GRACE.churn_grace_days).set_index("account_id")
    labels = label_accounts(frames.billing_accounts, frames.invoices, cutoff, GRACE).set_index("account_id")

    assert spells.loc[CHURNED, "churned"]
    assert not spells.loc[STAYING, "churned"]
    assert spells.loc[STAYING, "active"]
    assert labels.loc[CHURNED, "arpu"] == pytest.approx(108.15 / 2)
    # One day of the month after the reference date counts, at the current monthly charge.
    assert labels.loc[STAYING, "months_billed"] == pytest.approx(34 + 1 / 31)
    assert labels.loc[STAYING, "arpu"] == pytest.approx((1889.5 + 56.95 / 31) / (34 + 1 / 31))
    assert pd.isna(labels.loc[NEW_CUSTOMER, "arpu"])


def test_no_churn_on_reference_date(telco_extract, extract_through_mapping):
    frames = extract_through_mapping(
        telco_extract, lambda dialect: build_config(dialect, ASSUMPTIONS), ASSUMPTIONS.reference_date
    )

    spells = coverage_spells(frames.invoices, as_of_cutoff(ASSUMPTIONS.reference_date, "UTC"), 0)

    assert not spells["churned"].any()


def test_duplicate_rows_stay_distinct_customers(frames, telco_extract):
    raw = telco_extract[telco.RAW_CUSTOMERS]
    pair = rows_by_id(raw, "customerID", DUPLICATE_PAIR).drop(columns="customerID")

    assert pair.duplicated(keep=False).all()
    assert frames.billing_accounts["account_id"].isin(DUPLICATE_PAIR).sum() == 2


@pytest.mark.postgres
def test_postgresql_mapping_matches_sqlite(telco_extract, extract_through_mapping, postgres_url):
    def build(dialect):
        return build_config(dialect, ASSUMPTIONS)

    on_sqlite = extract_through_mapping(telco_extract, build, ASSUMPTIONS.as_of)
    on_postgres = extract_through_mapping(telco_extract, build, ASSUMPTIONS.as_of, url=postgres_url)

    for name in ("billing_accounts", "invoices"):
        key = getattr(on_sqlite, name).columns[0]
        expected = getattr(on_sqlite, name).sort_values(key).reset_index(drop=True)
        actual = getattr(on_postgres, name).sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(
            actual.astype(object), expected.astype(object), check_exact=False, rtol=1e-12, obj=name
        )


def test_assumptions_are_checked():
    with pytest.raises(ValueError, match="reference_date must be the first day of a month"):
        TelcoAssumptions(reference_date=dt.date(2024, 1, 15))
    assert TelcoAssumptions().as_of == dt.date(2024, 1, 2)


@pytest.mark.slow
def test_nightly_run_on_loaded_telco(shared_data, flow_settings_env):
    from flows.nightly import nightly_scores

    url = f"sqlite:///{flow_settings_env / 'telco.db'}"
    result = load_telco(shared_data, url)
    (flow_settings_env / "fulcrum.toml").write_text(result.config.render())

    run = nightly_scores(as_of=ASSUMPTIONS.as_of)

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        labels = pd.read_sql_table("account_ltv", connection)
        scores = connection.execute(sa.text("SELECT COUNT(*) FROM lead_scores")).scalar_one()
    engine.dispose()
    rates = labels.groupby("segment")["churn_rate"].first()
    assert run.status == "succeeded"
    assert run.accounts_labelled == len(labels) == 7043
    assert scores == 0
    assert int((~labels["is_active"].astype(bool)).sum()) == 1869
    assert rates["Month-to-month"] > rates["One year"] > rates["Two year"]
    assert any("skipped features, both models and scoring" in note for note in run.notes)
