"""Labels turn billing history into ARPU, margin, churn and LTV per account, as of a cutoff.

Every expected value below is worked out by hand from the small billing tables in the test.
The tests of the warehouse path also compare its labels with those of the pandas path.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from prefect.cache_policies import NO_CACHE

from fulcrum.contract import BILLING_ACCOUNTS, INVOICES, SOURCES
from fulcrum.settings import LtvSettings
from fulcrum.simulate import simulate_company
from fulcrum.warehouse import create_engine_for
from tasks import labels
from tasks.extract import SourceFrames, read_source_with_retries, restrict_to_cutoff
from tasks.labels import (
    ACCOUNT_LTV_COLUMNS,
    CHURN_RATE_COLUMNS,
    COVERAGE_SPELL_COLUMNS,
    DATA_PROBLEMS,
    MONTHLY_REVENUE_COLUMNS,
    _label_accounts,
    churn_rates,
    coverage_spells,
    expected_lifetime_months,
    find_data_problems,
    label_accounts,
    label_accounts_in_warehouse,
    label_accounts_task,
    monthly_revenue,
)

CUTOFF = pd.Timestamp("2024-07-01", tz="UTC")


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def settings(**overrides) -> LtvSettings:
    """LtvSettings with no smoothing and no minimum history unless a test sets them."""
    values = {"churn_prior_months": 0.0, "min_history_days": 0}
    values.update(overrides)
    return LtvSettings(**values)


def account(account_id: str, started: str, plan: str | None = "pro", currency: str = "USD"):
    return {
        "account_id": account_id,
        "started_at": utc(started),
        "cancelled_at": pd.NaT,
        "plan": plan,
        "currency": currency,
    }


def accounts_table(*rows: dict) -> pd.DataFrame:
    table = pd.DataFrame(list(rows), columns=BILLING_ACCOUNTS.column_names)
    for column in ("started_at", "cancelled_at"):
        table[column] = pd.to_datetime(table[column], utc=True)
    return table


def line(
    invoice_id: str,
    account_id: str,
    start: str,
    end: str,
    amount: float,
    *,
    cost: float = 0.0,
    kind: str = "charge",
    issued: str | None = None,
    currency: str = "USD",
) -> dict:
    """One invoice line, issued when its period starts unless ``issued`` is given."""
    return {
        "invoice_id": invoice_id,
        "account_id": account_id,
        "period_start": utc(start),
        "period_end": utc(end),
        "issued_at": utc(issued or start),
        "amount": float(amount),
        "cost": float(cost),
        "currency": currency,
        "kind": kind,
    }


def monthly_charges(account_id: str, first_month: str, months: int, amount: float) -> list[dict]:
    """One charge per calendar month, for ``months`` months from ``first_month``."""
    starts = pd.date_range(first_month, periods=months + 1, freq="MS", tz="UTC")
    return [
        line(f"{account_id}-{start:%Y%m}", account_id, str(start.date()), str(end.date()), amount)
        for start, end in zip(starts[:-1], starts[1:])
    ]


def invoices_table(*lines: dict) -> pd.DataFrame:
    table = pd.DataFrame(list(lines), columns=INVOICES.column_names)
    for column in ("period_start", "period_end", "issued_at"):
        table[column] = pd.to_datetime(table[column], utc=True)
    table[["amount", "cost"]] = table[["amount", "cost"]].astype("float64")
    return table


def row_of(frame: pd.DataFrame, account_id: str) -> pd.Series:
    rows = frame[frame["account_id"] == account_id]
    assert len(rows) == 1, f"expected one row for {account_id}, got {len(rows)}"
    return rows.iloc[0]


# ARPU: spreading revenue over service months


def test_mid_month_start_is_prorated():
    invoices = invoices_table(
        line("i1", "a", "2024-01-15", "2024-02-01", 170.0),
        line("i2", "a", "2024-02-01", "2024-03-01", 310.0),
        line("i3", "a", "2024-03-01", "2024-04-01", 310.0),
    )
    cutoff = utc("2024-04-01")

    monthly = monthly_revenue(invoices, cutoff)
    assert list(monthly.columns) == MONTHLY_REVENUE_COLUMNS
    assert list(monthly["month"]) == [utc("2024-01-01"), utc("2024-02-01"), utc("2024-03-01")]
    assert list(monthly["revenue"]) == pytest.approx([170.0, 310.0, 310.0])
    assert list(monthly["service_months"]) == pytest.approx([17 / 31, 1.0, 1.0])

    accounts = accounts_table(account("a", "2024-01-15"))
    labelled = label_accounts(accounts, invoices, cutoff, settings())
    a = row_of(labelled, "a")
    assert a["months_billed"] == pytest.approx(2 + 17 / 31)
    assert a["revenue"] == pytest.approx(790.0)
    # 790 / (79 / 31) = 310: the prorated month does not drag ARPU down.
    assert a["arpu"] == pytest.approx(310.0)


def test_annual_plan_is_spread_by_day():
    # 3650 over the 365 days of 2023 is 10 a day.
    invoices = invoices_table(line("i1", "a", "2023-01-01", "2024-01-01", 3650.0, cost=365.0))
    accounts = accounts_table(account("a", "2023-01-01"))

    monthly = monthly_revenue(invoices, utc("2023-04-01"))
    assert list(monthly["revenue"]) == pytest.approx([310.0, 280.0, 310.0])
    assert list(monthly["service_months"]) == pytest.approx([1.0, 1.0, 1.0])

    after_a_quarter = row_of(label_accounts(accounts, invoices, utc("2023-04-01"), settings()), "a")
    assert after_a_quarter["revenue"] == pytest.approx(900.0)
    assert after_a_quarter["cost"] == pytest.approx(90.0)
    assert after_a_quarter["months_billed"] == pytest.approx(3.0)
    assert after_a_quarter["arpu"] == pytest.approx(300.0)

    after_the_year = row_of(label_accounts(accounts, invoices, utc("2024-01-01"), settings()), "a")
    assert after_the_year["revenue"] == pytest.approx(3650.0)
    assert after_the_year["months_billed"] == pytest.approx(12.0)
    assert after_the_year["arpu"] == pytest.approx(3650.0 / 12)


def test_charge_past_cutoff_counts_until_cutoff():
    invoices = invoices_table(line("i1", "a", "2024-03-01", "2024-04-01", 310.0, cost=31.0))

    labelled = label_accounts(
        accounts_table(account("a", "2024-03-01")), invoices, utc("2024-03-11"), settings()
    )
    a = row_of(labelled, "a")
    # Ten of the period's 31 days lie before the cutoff.
    assert a["revenue"] == pytest.approx(100.0)
    assert a["cost"] == pytest.approx(10.0)
    assert a["months_billed"] == pytest.approx(10 / 31)
    assert a["arpu"] == pytest.approx(310.0)


def test_overlapping_charges_count_service_once():
    invoices = invoices_table(
        line("base", "a", "2024-01-01", "2024-02-01", 100.0),
        line("seats", "a", "2024-01-01", "2024-02-01", 50.0),
    )

    labelled = label_accounts(
        accounts_table(account("a", "2024-01-01")), invoices, utc("2024-02-01"), settings()
    )
    a = row_of(labelled, "a")
    assert a["months_billed"] == pytest.approx(1.0)
    assert a["arpu"] == pytest.approx(150.0)


def test_discount_reduces_arpu():
    invoices = invoices_table(
        # A 20 % discount already netted out of the charge.
        line("n1", "net", "2024-01-01", "2024-02-01", 80.0),
        # The same discount as a separate credit line for the same period.
        line("c1", "credited", "2024-01-01", "2024-02-01", 100.0),
        line("c2", "credited", "2024-01-01", "2024-02-01", -20.0, kind="credit"),
    )
    accounts = accounts_table(account("net", "2024-01-01"), account("credited", "2024-01-01"))

    labelled = label_accounts(accounts, invoices, utc("2024-02-01"), settings())
    assert row_of(labelled, "net")["arpu"] == pytest.approx(80.0)
    assert row_of(labelled, "credited")["arpu"] == pytest.approx(80.0)
    assert row_of(labelled, "credited")["months_billed"] == pytest.approx(1.0)


# Refunds and credits


def test_refund_lands_in_its_service_period():
    invoices = invoices_table(
        *monthly_charges("a", "2024-01-01", 3, 100.0),
        line("r1", "a", "2024-01-01", "2024-02-01", -40.0, kind="refund", issued="2024-03-15"),
    )

    before_refund = monthly_revenue(invoices, utc("2024-03-01"))
    assert list(before_refund["revenue"]) == pytest.approx([100.0, 100.0])

    after_refund = monthly_revenue(invoices, utc("2024-04-01"))
    assert list(after_refund["month"]) == [utc("2024-01-01"), utc("2024-02-01"), utc("2024-03-01")]
    assert list(after_refund["revenue"]) == pytest.approx([60.0, 100.0, 100.0])
    assert list(after_refund["service_months"]) == pytest.approx([1.0, 1.0, 1.0])

    labelled = label_accounts(
        accounts_table(account("a", "2024-01-01")), invoices, utc("2024-04-01"), settings()
    )
    assert row_of(labelled, "a")["revenue"] == pytest.approx(260.0)
    assert row_of(labelled, "a")["arpu"] == pytest.approx(260.0 / 3)


def test_refund_past_cutoff_counts_until_cutoff():
    invoices = invoices_table(
        line("i1", "a", "2024-03-01", "2024-04-01", 310.0),
        line("r1", "a", "2024-03-01", "2024-04-01", -31.0, kind="refund", issued="2024-03-02"),
    )

    labelled = label_accounts(
        accounts_table(account("a", "2024-03-01")), invoices, utc("2024-03-11"), settings()
    )
    # 10/31 of the charge less 10/31 of the refund.
    assert row_of(labelled, "a")["revenue"] == pytest.approx(100.0 - 10.0)


def test_credit_without_period_uses_issue_month():
    invoices = invoices_table(
        line("i1", "a", "2024-01-01", "2024-02-01", 100.0),
        line("c1", "a", "2024-01-01", "2024-01-01", -25.0, kind="credit", issued="2024-02-10"),
    )

    monthly = monthly_revenue(invoices, utc("2024-03-01"))
    assert list(monthly["month"]) == [utc("2024-01-01"), utc("2024-02-01")]
    assert list(monthly["revenue"]) == pytest.approx([100.0, -25.0])
    assert list(monthly["service_months"]) == pytest.approx([1.0, 0.0])

    labelled = label_accounts(
        accounts_table(account("a", "2024-01-01")), invoices, utc("2024-03-01"), settings()
    )
    assert row_of(labelled, "a")["revenue"] == pytest.approx(75.0)
    assert row_of(labelled, "a")["arpu"] == pytest.approx(75.0)


# Gross margin


def test_gross_margin_and_unprofitable_accounts():
    invoices = invoices_table(
        line("p1", "profitable", "2024-01-01", "2024-02-01", 200.0, cost=50.0),
        line("n1", "net_refunded", "2024-01-01", "2024-02-01", 100.0, cost=20.0),
        line("n2", "net_refunded", "2024-01-01", "2024-02-01", -150.0, kind="refund"),
        line("f1", "free", "2024-01-01", "2024-02-01", 0.0, cost=5.0),
    )
    accounts = accounts_table(
        account("profitable", "2024-01-01"),
        account("net_refunded", "2024-01-01"),
        account("free", "2024-01-01"),
    )

    labelled = label_accounts(accounts, invoices, utc("2024-02-01"), settings())

    profitable = row_of(labelled, "profitable")
    assert profitable["gross_margin"] == pytest.approx(0.75)
    # No churn at all, so the lifetime is the 60-month cap: 200 x 0.75 x 60.
    assert profitable["ltv"] == pytest.approx(9000.0)

    net_refunded = row_of(labelled, "net_refunded")
    assert net_refunded["arpu"] == pytest.approx(-50.0)
    assert math.isnan(net_refunded["gross_margin"])
    assert math.isnan(net_refunded["ltv"])

    free = row_of(labelled, "free")
    assert free["arpu"] == pytest.approx(0.0)
    assert math.isnan(free["gross_margin"])
    assert math.isnan(free["ltv"])
    assert not np.isinf(labelled[["gross_margin", "ltv"]].to_numpy()).any()


# Churn


def test_gap_beyond_grace_is_churn():
    invoices = invoices_table(
        line("g1", "gone", "2024-01-01", "2024-03-01", 200.0),
        line("p1", "paused", "2024-01-01", "2024-03-01", 200.0),
        # Resumes exactly 31 days after the end, which is within the grace period.
        line("p2", "paused", "2024-04-01", "2024-07-01", 300.0),
        line("l1", "lapsed", "2024-01-01", "2024-03-01", 200.0),
        line("l2", "lapsed", "2024-04-02", "2024-07-01", 300.0),
    )

    spells = coverage_spells(invoices, CUTOFF, grace_days=31)
    assert list(spells.columns) == COVERAGE_SPELL_COLUMNS
    by_account = {key: group for key, group in spells.groupby("account_id")}
    assert list(by_account["gone"]["churned"]) == [True]
    assert list(by_account["gone"]["active"]) == [False]
    assert list(by_account["paused"]["churned"]) == [False, False]
    assert list(by_account["paused"]["active"]) == [False, True]
    assert list(by_account["lapsed"]["churned"]) == [True, False]
    assert list(by_account["lapsed"]["active"]) == [False, True]


def test_reactivation_keeps_same_account():
    invoices = invoices_table(
        line("l1", "lapsed", "2024-01-01", "2024-03-01", 200.0),
        line("l2", "lapsed", "2024-04-02", "2024-07-01", 300.0),
    )

    labelled = label_accounts(
        accounts_table(account("lapsed", "2024-01-01")), invoices, CUTOFF, settings()
    )
    assert len(labelled) == 1
    lapsed = row_of(labelled, "lapsed")
    assert bool(lapsed["is_active"]) is True
    # January and February, 29 of April's 30 days, May and June.
    assert lapsed["months_billed"] == pytest.approx(4 + 29 / 30)
    # One churn event over the account's own covered months, since the segment has no other.
    assert lapsed["churn_rate"] == pytest.approx(1 / (4 + 29 / 30))


def test_coverage_ending_within_grace_is_censored():
    invoices = invoices_table(
        line("r1", "recent", "2024-01-01", "2024-06-10", 100.0),
        line("e1", "edge", "2024-01-01", "2024-05-31", 100.0),
        line("p1", "past", "2024-01-01", "2024-05-30", 100.0),
    )
    accounts = accounts_table(
        account("recent", "2024-01-01"),
        account("edge", "2024-01-01"),
        account("past", "2024-01-01"),
    )

    spells = coverage_spells(invoices, CUTOFF, grace_days=31).set_index("account_id")
    # Ended 21 days, exactly 31 days and 32 days before the cutoff.
    assert bool(spells.loc["recent", "churned"]) is False
    assert bool(spells.loc["edge", "churned"]) is False
    assert bool(spells.loc["past", "churned"]) is True

    labelled = label_accounts(accounts, invoices, CUTOFF, settings(churn_grace_days=31))
    assert bool(row_of(labelled, "recent")["is_active"]) is True
    assert bool(row_of(labelled, "edge")["is_active"]) is True
    assert bool(row_of(labelled, "past")["is_active"]) is False


def test_small_segment_churn_is_smoothed():
    invoices = invoices_table(
        line("p1", "p1", "2024-01-01", "2024-03-01", 200.0),
        line("t1", "t1", "2024-01-01", "2024-07-01", 600.0),
        line("t2", "t2", "2024-01-01", "2024-07-01", 600.0),
    )
    accounts = accounts_table(
        account("p1", "2024-01-01", plan="pro"),
        account("t1", "2024-01-01", plan="team"),
        account("t2", "2024-01-01", plan="team"),
    )

    labelled = label_accounts(accounts, invoices, CUTOFF, settings(churn_prior_months=10))

    # Overall: 1 event in 2 + 6 + 6 = 14 months.
    # pro: (1 + 10/14) / (2 + 10) = 1/7.  team: (0 + 10/14) / (12 + 10) = 5/154.
    # Lifetime within 60 months: (1 - (1 - c) ** 60) / c.
    p1 = row_of(labelled, "p1")
    p1_lifetime = 7 * (1 - (6 / 7) ** 60)
    assert p1["churn_rate"] == pytest.approx(1 / 7)
    assert p1["expected_lifetime_months"] == pytest.approx(p1_lifetime)
    assert p1["ltv"] == pytest.approx(100.0 * 1.0 * p1_lifetime)
    t1 = row_of(labelled, "t1")
    t1_lifetime = 30.8 * (1 - (149 / 154) ** 60)
    assert t1["churn_rate"] == pytest.approx(5 / 154)
    assert t1["expected_lifetime_months"] == pytest.approx(t1_lifetime)
    assert t1["ltv"] == pytest.approx(100.0 * 1.0 * t1_lifetime)


def test_churn_rates_raw_and_smoothed():
    accounts = pd.DataFrame(
        {
            "segment": ["pro", "team", "team", "empty"],
            "churn_events": [1, 0, 0, 0],
            "months_billed": [2.0, 6.0, 6.0, 0.0],
        }
    )

    rates = churn_rates(accounts, prior_months=10).set_index("segment")
    assert list(rates.reset_index().columns) == CHURN_RATE_COLUMNS
    assert rates.loc["pro", "churn_events"] == 1
    assert rates.loc["team", "months_at_risk"] == pytest.approx(12.0)
    assert rates.loc["pro", "raw_churn_rate"] == pytest.approx(0.5)
    assert rates.loc["team", "raw_churn_rate"] == pytest.approx(0.0)
    assert math.isnan(rates.loc["empty", "raw_churn_rate"])
    assert rates.loc["pro", "churn_rate"] == pytest.approx(1 / 7)
    # A segment with no months of its own gets the overall rate.
    assert rates.loc["empty", "churn_rate"] == pytest.approx(1 / 14)

    unsmoothed = churn_rates(accounts, prior_months=0).set_index("segment")
    assert math.isnan(unsmoothed.loc["empty", "churn_rate"])


# Lifetime and LTV


def test_zero_churn_uses_lifetime_cap():
    invoices = invoices_table(*monthly_charges("a", "2024-01-01", 6, 100.0))

    labelled = label_accounts(
        accounts_table(account("a", "2024-01-01")),
        invoices,
        CUTOFF,
        settings(lifetime_cap_months=48),
    )
    a = row_of(labelled, "a")
    assert a["churn_rate"] == 0.0
    assert a["expected_lifetime_months"] == 48.0
    assert a["ltv"] == pytest.approx(100.0 * 1.0 * 48)


def test_lifetime_is_geometric_sum_within_cap():
    churn = pd.Series([0.5, 0.0, np.nan, 0.01, 1.0, 3.0, 1e-15])

    lifetime = expected_lifetime_months(churn, cap_months=60)

    assert lifetime.iloc[0] == pytest.approx(2 * (1 - 0.5**60))
    assert lifetime.iloc[1] == 60.0
    assert math.isnan(lifetime.iloc[2])
    assert lifetime.iloc[3] == pytest.approx(100 * (1 - 0.99**60))
    assert lifetime.iloc[4] == 1.0
    assert lifetime.iloc[5] == 1.0
    # 60 - 1770e-15, the first two terms of the expansion in c.
    assert lifetime.iloc[6] == pytest.approx(60.0, abs=1e-9)
    assert lifetime.iloc[6] < 60.0


def test_short_history_gets_no_arpu():
    invoices = invoices_table(
        line("s1", "short", "2024-06-11", "2024-07-01", 200.0),
        line("e1", "exact", "2024-06-03", "2024-07-01", 280.0),
    )
    accounts = accounts_table(account("short", "2024-06-11"), account("exact", "2024-06-03"))

    labelled = label_accounts(accounts, invoices, CUTOFF, settings(min_history_days=28))

    short = row_of(labelled, "short")
    assert short["revenue"] == pytest.approx(200.0)
    assert short["months_billed"] == pytest.approx(20 / 30)
    assert short["gross_margin"] == pytest.approx(1.0)
    assert math.isnan(short["arpu"])
    assert math.isnan(short["ltv"])
    # 28 days is enough: 280 / (28 / 30) = 300.
    assert row_of(labelled, "exact")["arpu"] == pytest.approx(300.0)


# Empty and missing data


def test_empty_inputs_give_empty_frames():
    no_accounts = accounts_table()
    no_invoices = invoices_table()

    labelled = label_accounts(no_accounts, no_invoices, CUTOFF, settings())
    assert list(labelled.columns) == ACCOUNT_LTV_COLUMNS
    assert labelled.empty
    assert labelled["is_active"].dtype == bool
    assert labelled["ltv"].dtype == "float64"

    bare = label_accounts(pd.DataFrame(), pd.DataFrame(), CUTOFF, settings())
    assert list(bare.columns) == ACCOUNT_LTV_COLUMNS
    assert bare.empty

    assert list(monthly_revenue(no_invoices, CUTOFF).columns) == MONTHLY_REVENUE_COLUMNS
    assert list(coverage_spells(no_invoices, CUTOFF, 31).columns) == COVERAGE_SPELL_COLUMNS


def test_account_without_invoices_gets_empty_labels():
    labelled = label_accounts(
        accounts_table(account("new", "2024-06-30")), invoices_table(), CUTOFF, settings()
    )

    new = row_of(labelled, "new")
    assert new["months_billed"] == 0.0
    assert new["revenue"] == 0.0
    assert math.isnan(new["arpu"])
    assert math.isnan(new["churn_rate"])
    assert math.isnan(new["ltv"])
    assert bool(new["is_active"]) is False


def test_missing_segment_becomes_unknown():
    accounts = accounts_table(
        account("none", "2024-01-01", plan=None),
        account("blank", "2024-01-01", plan=" "),
        account("pro", "2024-01-01", plan="pro"),
    )

    labelled = label_accounts(accounts, invoices_table(), CUTOFF, settings())
    assert list(labelled["segment"]) == ["unknown", "unknown", "pro"]


def test_segment_column_is_configurable():
    accounts = accounts_table(account("a", "2024-01-01"), account("b", "2024-01-01"))
    accounts["billing_period"] = ["annual", "monthly"]

    labelled = label_accounts(
        accounts, invoices_table(), CUTOFF, settings(segment_column="billing_period")
    )
    assert list(labelled["segment"]) == ["annual", "monthly"]


# Currency


def test_labels_stay_in_account_currency():
    invoices = invoices_table(
        line("u1", "usd", "2024-01-01", "2024-03-01", 200.0),
        line("e1", "eur", "2024-01-01", "2024-03-01", 180.0, currency="EUR"),
        line("e2", "eur", "2024-01-01", "2024-03-01", 50.0, currency="USD"),
    )
    accounts = accounts_table(
        account("usd", "2024-01-01", currency="USD"),
        account("eur", "2024-01-01", currency="EUR"),
    )

    labelled = label_accounts(accounts, invoices, CUTOFF, settings())
    eur = row_of(labelled, "eur")
    assert eur["currency"] == "EUR"
    # The USD line on the EUR account is dropped, not converted.
    assert eur["revenue"] == pytest.approx(180.0)
    assert eur["arpu"] == pytest.approx(90.0)
    assert row_of(labelled, "usd")["arpu"] == pytest.approx(100.0)
    # Both churned in the same segment: 2 events over 4 months, whatever the currency.
    assert list(labelled["churn_rate"]) == pytest.approx([0.5, 0.5])
    problems = find_data_problems(accounts, invoices, CUTOFF, settings())
    assert problems["invoice_currency_mismatch"] == 1


# Point in time


def test_labels_ignore_invoices_issued_after_cutoff():
    history = [
        *monthly_charges("a", "2024-01-01", 3, 100.0),
        line("b1", "b", "2024-01-01", "2024-02-01", 100.0),
    ]
    later = [
        line("a-ref", "a", "2024-01-01", "2024-02-01", -60.0, kind="refund", issued="2024-04-10"),
        *monthly_charges("a", "2024-04-01", 3, 100.0),
        # Billed in arrears: issued after the cutoff for service before it.
        line("b-late", "b", "2024-02-01", "2024-04-01", 200.0, issued="2024-04-05"),
        line("c1", "c", "2024-05-01", "2024-06-01", 100.0),
    ]
    accounts = accounts_table(account("a", "2024-01-01"), account("b", "2024-01-01"))
    all_accounts = accounts_table(
        account("a", "2024-01-01"), account("b", "2024-01-01"), account("c", "2024-05-01")
    )
    early_cutoff = utc("2024-04-01")

    early = label_accounts(accounts, invoices_table(*history), early_cutoff, settings())
    recomputed = label_accounts(
        all_accounts, invoices_table(*history, *later), early_cutoff, settings()
    )
    pd.testing.assert_frame_equal(recomputed, early)

    early_monthly = monthly_revenue(invoices_table(*history), early_cutoff)
    recomputed_monthly = monthly_revenue(invoices_table(*history, *later), early_cutoff)
    pd.testing.assert_frame_equal(recomputed_monthly, early_monthly)

    # The appended invoices do change the labels for a later cutoff.
    late = label_accounts(all_accounts, invoices_table(*history, *later), CUTOFF, settings())
    assert row_of(late, "a")["revenue"] == pytest.approx(600.0 - 60.0)
    assert row_of(late, "b")["revenue"] == pytest.approx(300.0)
    assert len(late) == 3


# Inputs and data problems


def test_naive_cutoff_is_rejected():
    with pytest.raises(ValueError, match="cutoff must be a timezone-aware timestamp"):
        label_accounts(accounts_table(), invoices_table(), pd.Timestamp("2024-07-01"), settings())


def test_missing_segment_column_is_rejected():
    accounts = accounts_table(account("a", "2024-01-01"))

    with pytest.raises(ValueError, match="no column 'tier'"):
        label_accounts(accounts, invoices_table(), CUTOFF, settings(segment_column="tier"))


def test_missing_invoice_column_is_rejected():
    invoices = invoices_table(line("i1", "a", "2024-01-01", "2024-02-01", 100.0)).drop(
        columns="cost"
    )

    with pytest.raises(ValueError, match=r"invoices is missing the columns \['cost'\]"):
        label_accounts(accounts_table(account("a", "2024-01-01")), invoices, CUTOFF, settings())


def test_data_problems_are_counted_and_survived():
    good = line("ok", "a", "2024-01-01", "2024-02-01", 100.0)
    missing_amount = line("no-amount", "a", "2024-02-01", "2024-03-01", 100.0)
    missing_amount["amount"] = np.nan
    invoices = invoices_table(
        good,
        missing_amount,
        line("inverted", "a", "2024-03-01", "2024-02-01", 100.0),
        line("ok", "a", "2024-01-01", "2024-02-01", 100.0, issued="2024-01-02"),
        line("adj", "a", "2024-01-01", "2024-02-01", 10.0, kind="adjustment"),
        line("pos", "a", "2024-01-01", "2024-02-01", 5.0, kind="refund"),
        line("neg", "a", "2024-01-01", "2024-02-01", -5.0),
        line("ghost", "nobody", "2024-01-01", "2024-02-01", 100.0),
        line("eur", "a", "2024-01-01", "2024-02-01", 100.0, currency="EUR"),
    )
    # Broken rows that the cutoff hides are not reported.
    late_missing_cost = line("late", "a", "2024-07-01", "2024-08-01", 100.0)
    late_missing_cost["cost"] = np.nan
    invoices = pd.concat([invoices, invoices_table(late_missing_cost)], ignore_index=True)
    no_currency = account("x", "2024-01-01")
    no_currency["currency"] = None
    late_no_currency = account("y", "2024-07-02")
    late_no_currency["currency"] = None
    accounts = accounts_table(
        account("a", "2024-01-01"), account("a", "2024-02-01"), no_currency, late_no_currency
    )

    problems = find_data_problems(accounts, invoices, CUTOFF, settings())
    assert set(problems) == set(DATA_PROBLEMS)
    assert problems == {
        "invoice_missing_values": 1,
        "invoice_inverted_period": 1,
        "invoice_duplicate_id": 1,
        "invoice_unknown_kind": 1,
        "invoice_positive_refund": 1,
        "invoice_negative_charge": 1,
        "invoice_unknown_account": 1,
        "invoice_currency_mismatch": 1,
        "account_missing_values": 1,
        "account_duplicate_id": 1,
    }

    labelled = label_accounts(accounts, invoices, CUTOFF, settings())
    assert list(labelled["account_id"]) == ["a"]
    # ok 100 + adjustment 10 + positive refund 5 + negative charge -5, all in January.
    assert row_of(labelled, "a")["revenue"] == pytest.approx(110.0)
    assert row_of(labelled, "a")["months_billed"] == pytest.approx(1.0)


def test_far_future_period_end_is_safe():
    invoices = invoices_table(line("i1", "a", "2024-01-01", "9999-12-31", 0.0))

    labelled = label_accounts(
        accounts_table(account("a", "2024-01-01")), invoices, utc("2024-02-01"), settings()
    )
    assert row_of(labelled, "a")["months_billed"] == pytest.approx(1.0)
    assert bool(row_of(labelled, "a")["is_active"]) is True


# Prefect task


def frames_for(billing_accounts: pd.DataFrame, invoices: pd.DataFrame) -> SourceFrames:
    empty = pd.DataFrame()
    return SourceFrames(
        leads=empty,
        lead_events=empty,
        opportunities=empty,
        billing_accounts=billing_accounts,
        invoices=invoices,
    )


def test_task_not_retried_or_cached():
    assert label_accounts_task.name == "label-accounts"
    assert label_accounts_task.retries == 0
    assert label_accounts_task.cache_policy == NO_CACHE


def test_task_logs_counts_and_problems(monkeypatch, caplog):
    logger = logging.getLogger("test_labels.run")
    monkeypatch.setattr(labels, "get_run_logger", lambda: logger)
    invoices = invoices_table(
        *monthly_charges("a", "2024-01-01", 6, 100.0),
        line("ghost", "nobody", "2024-01-01", "2024-02-01", 100.0),
    )
    accounts = accounts_table(account("a", "2024-01-01"), account("b", "2024-01-01", plan="team"))

    with caplog.at_level(logging.INFO, logger="test_labels.run"):
        result = label_accounts_task.fn(frames_for(accounts, invoices), CUTOFF, settings())

    assert list(result["account_id"]) == ["a", "b"]
    info = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(info) == 1
    assert "Labelled 2 billing accounts in 2 segments" in info[0]
    assert "1 active, 1 with an LTV" in info[0]
    # 100 a month, no cost, no churn: 100 x 1 x 60.
    assert "median LTV USD 6000.00" in info[0]
    assert len(warnings) == 1
    assert "1 invoice lines for accounts not in billing_accounts" in warnings[0]


def test_task_quiet_on_clean_data(monkeypatch, caplog):
    logger = logging.getLogger("test_labels.run")
    monkeypatch.setattr(labels, "get_run_logger", lambda: logger)
    frames = frames_for(accounts_table(), invoices_table())

    with caplog.at_level(logging.INFO, logger="test_labels.run"):
        label_accounts_task.fn(frames, CUTOFF, settings())

    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert "median LTV none" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_task_runs_in_prefect_flow(prefect_api):
    from prefect import flow

    accounts = accounts_table(account("a", "2024-01-01"))
    invoices = invoices_table(*monthly_charges("a", "2024-01-01", 6, 100.0))

    @flow(name="label-accounts-test")
    def label_flow() -> pd.DataFrame:
        return label_accounts_task(frames_for(accounts, invoices), CUTOFF, settings())

    result = label_flow()

    assert list(result["account_id"]) == ["a"]
    assert result["ltv"].iloc[0] == pytest.approx(6000.0)


# Labels computed in the warehouse

SIMULATION_END = dt.date(2024, 7, 1)


def drop_schema(url: str, schema: str) -> None:
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))
    finally:
        engine.dispose()


def create_schema(url: str, schema: str) -> None:
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.schema.CreateSchema(schema))
    finally:
        engine.dispose()


DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=DIALECTS)
def warehouse(request, tmp_path):
    """Return (url, schema) of an empty warehouse: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'billing.db'}", None
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"labels_{uuid.uuid4().hex[:10]}"
    create_schema(url, schema)
    try:
        yield url, schema
    finally:
        drop_schema(url, schema)


@pytest.fixture(scope="module", params=DIALECTS)
def simulated_warehouse(request, tmp_path_factory):
    """Return (url, schema) of a simulated company of 4,000 leads over 24 months."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('simulated') / 'warehouse.db'}"
        schema = None
    else:
        url = request.getfixturevalue("postgres_url")
        schema = f"labels_{uuid.uuid4().hex[:10]}"
    simulate_company(url, leads=4000, months=24, seed=23, end=SIMULATION_END, schema=schema)
    try:
        yield url, schema
    finally:
        if schema is not None:
            drop_schema(url, schema)


def source_mapping(schema: str | None, **tables: str) -> dict[str, dict]:
    """Map billing_accounts and invoices to tables in ``schema``, by default their own names."""
    names = {"billing_accounts": "billing_accounts", "invoices": "invoices", **tables}
    return {source: {"table": table, "schema": schema} for source, table in names.items()}


def nullable_billing_tables(schema: str | None) -> tuple[sa.Table, sa.Table]:
    """Tables with the contract's billing columns, all nullable and without keys, to store
    the rows that the contract's own tables reject."""
    types = {"string": sa.Text, "timestamp": lambda: sa.DateTime(timezone=True), "float": sa.Float}
    metadata = sa.MetaData()
    tables = [
        sa.Table(
            f"raw_{contract.name}",
            metadata,
            *(sa.Column(column.name, types[column.kind]()) for column in contract.columns),
            schema=schema,
        )
        for contract in (BILLING_ACCOUNTS, INVOICES)
    ]
    return tables[0], tables[1]


def database_value(value):
    """Return a value of account() or line() as the driver takes it, with None for missing."""
    if value is None or isinstance(value, str):
        return value
    if pd.isna(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value


def insert_rows(engine: sa.Engine, table: sa.Table, rows: list[dict]) -> None:
    """Create ``table`` and insert ``rows``."""
    records = [{key: database_value(value) for key, value in row.items()} for row in rows]
    table.create(engine)
    if records:
        with engine.begin() as connection:
            connection.execute(table.insert(), records)


def write_billing(url: str, schema: str | None, accounts: list[dict], lines: list[dict]) -> None:
    engine = create_engine_for(url)
    try:
        account_table, invoice_table = nullable_billing_tables(schema)
        insert_rows(engine, account_table, accounts)
        insert_rows(engine, invoice_table, lines)
    finally:
        engine.dispose()


def read_whole(url: str, query: sa.Select | sa.TextClause) -> pd.DataFrame:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return pd.read_sql_query(query, connection)
    finally:
        engine.dispose()


def label_in_warehouse(settings, cutoff: pd.Timestamp) -> tuple[pd.DataFrame, dict[str, int]]:
    engine = create_engine_for(settings.warehouse_url.get_secret_value())
    try:
        return label_accounts_in_warehouse(engine, settings, cutoff)
    finally:
        engine.dispose()


def assert_same_labels(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Compare label frames: floats within a relative 1e-9, everything else exactly."""
    assert list(actual.columns) == list(expected.columns)
    assert actual.dtypes.to_dict() == expected.dtypes.to_dict()
    assert len(actual) == len(expected)
    for column in expected.columns:
        if expected[column].dtype == "float64":
            np.testing.assert_allclose(
                actual[column].to_numpy(),
                expected[column].to_numpy(),
                rtol=1e-9,
                atol=0.0,
                err_msg=column,
            )
        else:
            assert actual[column].tolist() == expected[column].tolist(), column


@pytest.mark.parametrize(
    "cutoff",
    [utc("2024-07-01"), utc("2024-03-15 06:30")],
    ids=["month-start", "mid-month"],
)
def test_warehouse_matches_pandas_on_simulation(
    simulated_warehouse, settings_factory, cutoff
):
    url, schema = simulated_warehouse
    settings = settings_factory(warehouse_url=url, sources=source_mapping(schema))
    engine = create_engine_for(url)
    try:
        frames = {
            name: restrict_to_cutoff(
                read_source_with_retries(engine, name, settings, cutoff), SOURCES[name], cutoff
            )
            for name in ("billing_accounts", "invoices")
        }
    finally:
        engine.dispose()
    expected, expected_problems = _label_accounts(
        frames["billing_accounts"], frames["invoices"], cutoff, settings.ltv
    )

    actual, problems = label_in_warehouse(settings, cutoff)

    assert problems == expected_problems
    assert_same_labels(actual, expected)
    # The comparison covers churned, active and reactivated accounts, and accounts with an LTV.
    assert len(expected) > 100
    assert expected["is_active"].any()
    assert not expected["is_active"].all()
    assert expected["ltv"].notna().any()
    spells = coverage_spells(frames["invoices"], cutoff, settings.ltv.churn_grace_days)
    assert spells["churned"].any()
    assert spells["account_id"].duplicated().any()


def test_warehouse_counts_every_data_problem(warehouse, settings_factory):
    url, schema = warehouse
    missing_amount = line("no-amount", "a", "2024-02-01", "2024-03-01", 100.0)
    missing_amount["amount"] = None
    missing_issue = line("no-issue", "a", "2024-02-01", "2024-03-01", 100.0)
    missing_issue["issued_at"] = None
    # Broken rows that the cutoff hides are not reported.
    late_missing_cost = line("late-no-cost", "a", "2024-07-01", "2024-08-01", 100.0)
    late_missing_cost["cost"] = None
    lines = [
        line("ok", "a", "2024-01-01", "2024-02-01", 100.0, cost=10.0),
        line("ok", "a", "2024-01-01", "2024-02-01", 100.0, issued="2024-01-02"),
        missing_amount,
        missing_issue,
        late_missing_cost,
        line("inverted", "a", "2024-03-01", "2024-02-01", 100.0),
        line("late-inverted", "a", "2024-09-01", "2024-08-01", 100.0, issued="2024-07-05"),
        line("adj", "a", "2024-01-01", "2024-02-01", 10.0, kind="adjustment"),
        line("no-kind", "a", "2024-01-01", "2024-02-01", 1.0, kind=None),
        line("pos", "a", "2024-01-01", "2024-02-01", 5.0, kind="refund"),
        line("neg", "a", "2024-01-01", "2024-02-01", -5.0),
        line("ghost", "nobody", "2024-01-01", "2024-02-01", 100.0),
        line("x-line", "x", "2024-01-01", "2024-02-01", 100.0),
        line("eur", "a", "2024-01-01", "2024-02-01", 100.0, currency="EUR"),
        line("no-currency", "a", "2024-01-01", "2024-02-01", 100.0, currency=None),
        # 3650 over the 365 days to 2025-03-10 is 10 a day, and 113 days lie before the cutoff.
        line("b-annual", "b", "2024-03-10", "2025-03-10", 3650.0, cost=365.0),
        line("b-credit", "b", "2024-04-15", "2024-04-15", -30.0, kind="credit"),
        line("b-renewal", "b", "2025-03-10", "2026-03-10", 3650.0, issued="2024-06-30"),
        line("d-jan", "d", "2024-01-01", "2024-02-01", 50.0),
        line("d-feb", "d", "2024-02-01", "2024-03-01", 50.0),
        line("d-may", "d", "2024-05-01", "2024-06-01", 50.0),
        line("f-open", "f", "2024-06-01", "9999-12-31", 0.0),
    ]
    no_currency = account("x", "2024-01-01")
    no_currency["currency"] = None
    late_no_currency = account("y", "2024-07-02")
    late_no_currency["currency"] = None
    no_start = account("z", "2024-01-01")
    no_start["started_at"] = None
    accounts = [
        account("a", "2024-01-01"),
        account("a", "2024-02-01", plan="team"),
        no_currency,
        late_no_currency,
        no_start,
        account("b", "2024-03-10", plan="  "),
        account("c", "2024-05-01", plan=None, currency="EUR"),
        account("d", "2024-01-01"),
        account("f", "2024-06-01", plan="team"),
    ]
    write_billing(url, schema, accounts, lines)
    settings = settings_factory(
        warehouse_url=url,
        sources=source_mapping(
            schema, billing_accounts="raw_billing_accounts", invoices="raw_invoices"
        ),
    )

    labelled, problems = label_in_warehouse(settings, CUTOFF)

    assert problems == {
        "invoice_missing_values": 2,
        "invoice_inverted_period": 1,
        "invoice_duplicate_id": 1,
        "invoice_unknown_kind": 2,
        "invoice_positive_refund": 1,
        "invoice_negative_charge": 1,
        "invoice_unknown_account": 2,
        "invoice_currency_mismatch": 2,
        "account_missing_values": 2,
        "account_duplicate_id": 1,
    }
    assert list(labelled["account_id"]) == ["a", "b", "c", "d", "f"]
    assert list(labelled["segment"]) == ["pro", "unknown", "unknown", "pro", "team"]
    assert list(labelled["currency"]) == ["USD", "USD", "EUR", "USD", "USD"]
    # a: ok 100, adjustment 10, no kind 1, positive refund 5 and negative charge -5.
    # b: 113 days of the annual charge less the one-off credit of 30.
    assert list(labelled["revenue"]) == pytest.approx([111.0, 1100.0, 0.0, 150.0, 0.0])
    assert list(labelled["cost"]) == pytest.approx([10.0, 113.0, 0.0, 0.0, 0.0])
    assert list(labelled["months_billed"]) == pytest.approx([1.0, 3 + 22 / 31, 0.0, 3.0, 1.0])
    assert list(labelled["is_active"]) == [False, True, False, True, True]

    expected, expected_problems = _label_accounts(
        read_whole(url, sa.select(nullable_billing_tables(schema)[0])),
        read_whole(url, sa.select(nullable_billing_tables(schema)[1])),
        CUTOFF,
        settings.ltv,
    )
    assert problems == expected_problems
    assert_same_labels(labelled, expected)


def test_warehouse_follows_docs_churn_example(warehouse, settings_factory):
    url, schema = warehouse
    lines = [
        line("g1", "gone", "2024-01-01", "2024-03-01", 200.0),
        line("p1", "paused", "2024-01-01", "2024-03-01", 200.0),
        line("p2", "paused", "2024-04-01", "2024-07-01", 300.0),
        line("l1", "lapsed", "2024-01-01", "2024-03-01", 200.0),
        line("l2", "lapsed", "2024-04-02", "2024-07-01", 300.0),
        line("r1", "recent", "2024-01-01", "2024-06-10", 100.0),
        line("e1", "edge", "2024-01-01", "2024-05-31", 100.0),
        line("s1", "past", "2024-01-01", "2024-05-30", 100.0),
        # The add-on ends before the April charge starts, but the annual plan still covers it.
        line("n1", "nested", "2024-01-01", "2024-12-31", 3650.0),
        line("n2", "nested", "2024-02-01", "2024-03-01", 20.0),
        line("n3", "nested", "2024-04-01", "2024-05-01", 20.0),
    ]
    names = ["edge", "gone", "lapsed", "nested", "past", "paused", "recent"]
    accounts = [account(name, "2024-01-01") for name in names]
    write_billing(url, schema, accounts, lines)
    settings = settings_factory(
        warehouse_url=url,
        sources=source_mapping(
            schema, billing_accounts="raw_billing_accounts", invoices="raw_invoices"
        ),
        ltv={"churn_prior_months": 10.0, "churn_grace_days": 31},
    )

    labelled, _ = label_in_warehouse(settings, CUTOFF)

    assert list(labelled["account_id"]) == names
    assert list(labelled["is_active"]) == [True, False, True, True, False, True, True]
    # lapsed: January and February, 29 of April's 30 days, May and June.
    assert list(labelled["months_billed"]) == pytest.approx(
        [5 - 1 / 31, 2.0, 4 + 29 / 30, 6.0, 5 - 2 / 31, 5.0, 5 + 9 / 30]
    )
    expected, _ = _label_accounts(
        read_whole(url, sa.select(nullable_billing_tables(schema)[0])),
        read_whole(url, sa.select(nullable_billing_tables(schema)[1])),
        CUTOFF,
        settings.ltv,
    )
    assert_same_labels(labelled, expected)


def export_table(schema: str | None) -> sa.Table:
    """A billing export with its own column names, and text in every column."""
    names = [
        "line_ref",
        "customer",
        "service_from",
        "service_to",
        "billed_at",
        "net",
        "cost_to_serve",
        "ccy",
        "line_type",
    ]
    return sa.Table(
        "invoice_export",
        sa.MetaData(),
        *(sa.Column(name, sa.Text) for name in names),
        schema=schema,
    )


def export_mapping(schema: str | None) -> str:
    table = f"{schema}.invoice_export" if schema else "invoice_export"
    return (
        "SELECT line_ref AS invoice_id, customer AS account_id, service_from AS period_start, "
        "service_to AS period_end, billed_at AS issued_at, net AS amount, "
        f"cost_to_serve AS cost, ccy AS currency, line_type AS kind FROM {table}"
    )


def export_line(reference: str, start: str, end: str, amount: str, issued: str = "") -> dict:
    return {
        "line_ref": reference,
        "customer": "m",
        "service_from": start,
        "service_to": end,
        "billed_at": issued or start,
        "net": amount,
        "cost_to_serve": "0",
        "ccy": "USD",
        "line_type": "charge",
    }


def test_warehouse_reads_sql_mapping(warehouse, settings_factory):
    url, schema = warehouse
    account_table, _ = nullable_billing_tables(schema)
    engine = create_engine_for(url)
    try:
        insert_rows(engine, account_table, [account("m", "2024-01-15", plan="growth")])
        insert_rows(
            engine,
            export_table(schema),
            [
                export_line("m1", "2024-01-15T00:00:00Z", "2024-02-01T00:00:00Z", "170"),
                export_line("m2", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z", "310.0"),
                export_line("m3", "2024-03-01T00:00:00Z", "2024-04-01T00:00:00Z", "310"),
                # 20 June 10:00 UTC to 20 July: 254 of the period's 720 hours lie before the cutoff.
                export_line(
                    "m4", "2024-06-20T12:00:00+02:00", "2024-07-20T12:00:00+02:00", "300"
                ),
            ],
        )
    finally:
        engine.dispose()
    sources = source_mapping(schema, billing_accounts="raw_billing_accounts")
    sources["invoices"] = {"sql": export_mapping(schema)}
    settings = settings_factory(warehouse_url=url, sources=sources)

    labelled, problems = label_in_warehouse(settings, CUTOFF)

    assert set(problems.values()) == {0}
    m = row_of(labelled, "m")
    assert m["revenue"] == pytest.approx(790.0 + 300.0 * 254 / 720)
    assert m["months_billed"] == pytest.approx(2 + 17 / 31 + 254 / 720)
    assert bool(m["is_active"]) is True
    expected, _ = _label_accounts(
        read_whole(url, sa.select(account_table)),
        read_whole(url, sa.text(export_mapping(schema))),
        CUTOFF,
        settings.ltv,
    )
    assert_same_labels(labelled, expected)


def test_warehouse_rejects_unparsable_timestamp(warehouse, settings_factory):
    url, schema = warehouse
    account_table, _ = nullable_billing_tables(schema)
    engine = create_engine_for(url)
    try:
        insert_rows(engine, account_table, [account("m", "2024-01-15")])
        insert_rows(
            engine,
            export_table(schema),
            [export_line("m1", "2024-01-15", "2024-02-01", "170", issued="soon")],
        )
    finally:
        engine.dispose()
    sources = source_mapping(schema, billing_accounts="raw_billing_accounts")
    sources["invoices"] = {"sql": export_mapping(schema)}
    settings = settings_factory(warehouse_url=url, sources=sources)

    if schema is None:
        message = r"invoices\.issued_at has 1 values that are not timestamps, for example \['soon'\]"
    else:
        message = r"contain a value that labelling cannot read: InvalidDatetimeFormat"
    with pytest.raises(ValueError, match=message):
        label_in_warehouse(settings, CUTOFF)


def test_warehouse_empty_sources_match_pandas(warehouse, settings_factory):
    url, schema = warehouse
    write_billing(url, schema, [], [])
    settings = settings_factory(
        warehouse_url=url,
        sources=source_mapping(
            schema, billing_accounts="raw_billing_accounts", invoices="raw_invoices"
        ),
    )

    labelled, problems = label_in_warehouse(settings, CUTOFF)

    expected, expected_problems = _label_accounts(
        accounts_table(), invoices_table(), CUTOFF, settings.ltv
    )
    assert problems == expected_problems
    assert_same_labels(labelled, expected)


def test_warehouse_absent_sources_give_no_labels(settings_factory):
    absent = {"absent": True}
    settings = settings_factory(sources={"billing_accounts": absent, "invoices": absent})

    labelled, problems = label_in_warehouse(settings, CUTOFF)

    assert list(labelled.columns) == ACCOUNT_LTV_COLUMNS
    assert labelled.empty
    assert problems == dict.fromkeys(DATA_PROBLEMS, 0)


def test_warehouse_rejects_missing_segment_column(sqlite_url, settings_factory):
    write_billing(sqlite_url, None, [account("a", "2024-01-01")], [])
    sources = source_mapping(None, billing_accounts="raw_billing_accounts", invoices="raw_invoices")
    settings = settings_factory(
        warehouse_url=sqlite_url, sources=sources, ltv={"segment_column": "tier"}
    )

    with pytest.raises(ValueError, match="billing_accounts has no column 'tier'"):
        label_in_warehouse(settings, CUTOFF)


def test_warehouse_allows_missing_segment_without_rows(sqlite_url, settings_factory):
    write_billing(sqlite_url, None, [], [])
    sources = source_mapping(None, billing_accounts="raw_billing_accounts", invoices="raw_invoices")
    settings = settings_factory(
        warehouse_url=sqlite_url, sources=sources, ltv={"segment_column": "tier"}
    )

    labelled, _ = label_in_warehouse(settings, CUTOFF)

    assert list(labelled.columns) == ACCOUNT_LTV_COLUMNS
    assert labelled.empty


def test_warehouse_rejects_naive_cutoff(sqlite_url, settings_factory):
    settings = settings_factory(warehouse_url=sqlite_url)

    with pytest.raises(ValueError, match="cutoff must be a timezone-aware timestamp"):
        label_in_warehouse(settings, pd.Timestamp("2024-07-01"))
