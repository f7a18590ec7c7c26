"""The simulated company: shapes, economics, ground truth, determinism and both backends."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

import fulcrum.simulate as simulate_module
from fulcrum.contract import SOURCES, define_source_tables, define_truth_table
from fulcrum.simulate import (
    EVENT_TYPES,
    PLANS,
    TABLE_ORDER,
    SimulationSummary,
    oracle_conversion_probability,
    simulate_company,
)
from fulcrum.warehouse import create_engine_for

END = dt.date(2025, 6, 1)
END_TS = pd.Timestamp(END, tz="UTC")
HORIZON_DAYS = 90
MONTH_DAYS = 365.25 / 12
CHANNELS = {"organic", "paid_search", "paid_social", "referral", "events", "outbound", "partner"}


@dataclass
class Company:
    url: str
    summary: SimulationSummary
    tables: dict[str, pd.DataFrame]


def read_tables(url: str, names: tuple[str, ...] = TABLE_ORDER) -> dict[str, pd.DataFrame]:
    """Read every simulated table back, with timestamps as UTC-aware pandas datetimes.

    Rows come back as the driver returns them, and timestamp columns are parsed by pandas
    in one go: SQLite returns its stored text, PostgreSQL aware datetimes.
    """
    engine = create_engine_for(url)
    metadata = sa.MetaData()
    definitions = define_source_tables(metadata)
    definitions["simulation_truth"] = define_truth_table(metadata)
    tables = {}
    try:
        with engine.connect() as connection:
            for name in names:
                table = definitions[name]
                frame = pd.read_sql_query(sa.text(f"SELECT * FROM {name}"), connection)
                for column in table.columns:
                    if isinstance(column.type, sa.DateTime):
                        frame[column.name] = pd.to_datetime(
                            frame[column.name], utc=True, format="ISO8601"
                        )
                    elif isinstance(column.type, sa.Boolean):
                        frame[column.name] = frame[column.name].map({1: True, 0: False})
                tables[name] = frame
    finally:
        engine.dispose()
    return tables


def simulate_and_read(path: Path, names: tuple[str, ...] = TABLE_ORDER, **arguments) -> Company:
    url = f"sqlite:///{path}"
    summary = simulate_company(url, **arguments)
    return Company(url, summary, read_tables(url, names))


@pytest.fixture(scope="module")
def company(tmp_path_factory) -> Company:
    """20,000 leads over 24 months: the shapes and exact rules."""
    path = tmp_path_factory.mktemp("small") / "warehouse.db"
    return simulate_and_read(
        path, leads=20_000, months=24, seed=11, end=END, horizon_days=HORIZON_DAYS
    )


@pytest.fixture(scope="module")
def long_company(tmp_path_factory) -> Company:
    """150,000 leads over 72 months, without events: the statistics.

    Only about 1 lead in 3,000 becomes an enterprise account, so a shorter or smaller
    company has too few enterprise account-months to show that their churn stays under
    1 % a month. Seventy-two months also leave five full years of billing for the
    accounts of the first year.
    """
    path = tmp_path_factory.mktemp("long") / "warehouse.db"
    names = tuple(name for name in TABLE_ORDER if name != "lead_events")
    return simulate_and_read(
        path, names, leads=150_000, months=72, seed=5, end=END, horizon_days=HORIZON_DAYS
    )


def size_band(employees: pd.Series) -> pd.Series:
    return pd.cut(
        employees,
        [0, 25, 200, 1000, np.inf],
        right=False,
        labels=["1-24", "25-199", "200-999", "1000+"],
    )


def won_opportunities(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    opportunities = tables["opportunities"]
    return opportunities[opportunities["won"].eq(True)]


def month_start(timestamps: pd.Series, months_later: int = 0) -> pd.Series:
    """First instant, in UTC, of the month of each timestamp, moved ``months_later`` months on."""
    periods = timestamps.dt.tz_localize(None).dt.to_period("M") + months_later
    return periods.dt.to_timestamp().dt.tz_localize("UTC")


def months_between(start: pd.Series, end: pd.Series) -> pd.Series:
    return (end.dt.year - start.dt.year) * 12 + end.dt.month - start.dt.month


def charges_in_order(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Charge lines per account in period order, numbered from 0, with the billing period."""
    accounts = tables["billing_accounts"].set_index("account_id")
    charges = (
        tables["invoices"].query("kind == 'charge'").sort_values(["account_id", "period_start"])
    )
    return charges.assign(
        number=charges.groupby("account_id").cumcount(),
        billing_period=charges["account_id"].map(accounts["billing_period"]),
        plan=charges["account_id"].map(accounts["plan"]),
    )


def monthly_churn_by_plan(tables: dict[str, pd.DataFrame]) -> pd.Series:
    """Churns per month of service whose renewal decision falls before the end, per plan.

    Every charge period that ends before the end is followed either by the next charge
    starting at its period_end or by a churn: a gap, then a reactivation or nothing. An
    annual period carries twelve months of exposure for its one decision, so annual and
    monthly accounts measure the same monthly hazard.
    """
    charges = (
        tables["invoices"].query("kind == 'charge'").sort_values(["account_id", "period_start"])
    )
    next_start = charges.groupby("account_id")["period_start"].shift(-1)
    decided = charges["period_end"] < END_TS
    churned = decided & (next_start != charges["period_end"])
    months = (
        (charges["period_end"] - charges["period_start"]).dt.total_seconds() / 86_400 / MONTH_DAYS
    )
    plan = charges["account_id"].map(tables["billing_accounts"].set_index("account_id")["plan"])
    totals = pd.DataFrame({"plan": plan, "churns": churned, "months": months.where(decided, 0.0)})
    totals = totals.groupby("plan")[["churns", "months"]].sum()
    return totals["churns"] / totals["months"]


def test_row_counts_match_summary(company):
    tables = company.tables
    assert {name: len(frame) for name, frame in tables.items()} == company.summary.row_counts
    assert len(tables["leads"]) == 20_000
    assert len(tables["simulation_truth"]) == 20_000
    assert tables["leads"]["lead_id"].is_unique
    assert set(tables["simulation_truth"]["lead_id"]) == set(tables["leads"]["lead_id"])
    assert len(tables["billing_accounts"]) == len(won_opportunities(tables))
    assert company.summary.customers == len(tables["billing_accounts"])


def test_columns_follow_contract(company):
    for name, contract in SOURCES.items():
        frame = company.tables[name]
        assert set(contract.column_names) <= set(frame.columns), name
        for column in contract.required_columns:
            assert frame[column].notna().all(), f"{name}.{column}"
    assert "country" in company.tables["leads"].columns
    assert {"seats", "billing_period"} <= set(company.tables["billing_accounts"].columns)


def test_categories_cover_all_values(company):
    tables = company.tables
    assert set(tables["leads"]["channel"]) == CHANNELS
    assert set(tables["lead_events"]["event_type"]) == set(EVENT_TYPES)
    assert set(tables["billing_accounts"]["plan"]) == {plan.name for plan in PLANS}
    assert set(tables["billing_accounts"]["billing_period"]) == {"monthly", "annual"}
    assert set(tables["billing_accounts"]["currency"]) == {"USD"}
    assert set(tables["invoices"]["currency"]) == {"USD"}
    assert set(tables["invoices"]["kind"]) == {"charge", "refund", "credit"}


def test_employees_heavy_tailed(company):
    employees = company.tables["leads"]["employees"].dropna()
    assert employees.min() >= 1
    assert 0.80 <= (employees <= 200).mean() <= 0.95
    assert (employees >= 1000).sum() > 100
    assert employees.max() > 5000
    assert 0.03 <= company.tables["leads"]["employees"].isna().mean() <= 0.12


def test_timestamps_before_end(company):
    tables = company.tables
    assert tables["leads"]["created_at"].min() >= END_TS - pd.DateOffset(months=24)
    for name, frame in tables.items():
        for column in frame.select_dtypes("datetimetz").columns:
            if column != "period_end":
                assert (frame[column].dropna() < END_TS).all(), f"{name}.{column}"
    # Service is billed in advance, so a period may end up to a year after the end.
    assert tables["invoices"]["period_end"].max() <= END_TS + pd.DateOffset(months=12)


def test_events_follow_lead_lifecycle(company):
    tables = company.tables
    leads = tables["leads"].set_index("lead_id")
    events = tables["lead_events"].join(leads[["created_at", "disqualified_at"]], on="lead_id")
    assert (events["occurred_at"] >= events["created_at"]).all()

    won_at = won_opportunities(tables).set_index("lead_id")["closed_at"]
    events["won_at"] = events["lead_id"].map(won_at)
    after_win = events["occurred_at"] - events["won_at"]
    assert after_win.max() <= pd.Timedelta(days=14)
    assert (after_win > pd.Timedelta(0)).any()
    after_disqualified = events["occurred_at"] - events["disqualified_at"]
    assert after_disqualified.max() <= pd.Timedelta(days=14)


def test_activity_predicts_conversion(company):
    """Leads with a pricing view or demo request in their first two weeks convert far more often."""
    tables = company.tables
    leads = tables["leads"].set_index("lead_id")
    old = leads[leads["created_at"] < END_TS - pd.Timedelta(days=180)]
    events = tables["lead_events"].join(leads["created_at"], on="lead_id", how="inner")
    early = events[
        (events["occurred_at"] - events["created_at"] < pd.Timedelta(days=14))
        & events["event_type"].isin(["pricing_page_view", "demo_request"])
    ]
    engaged = old.index.isin(early["lead_id"])
    converted = old.index.isin(won_opportunities(tables)["lead_id"])
    assert converted[engaged].mean() > 2 * converted[~engaged].mean()


def test_disqualified_leads_never_convert(company):
    tables = company.tables
    disqualified = tables["leads"].loc[tables["leads"]["disqualified_at"].notna(), "lead_id"]
    assert 0.15 <= len(disqualified) / len(tables["leads"]) <= 0.45
    assert not won_opportunities(tables)["lead_id"].isin(disqualified).any()


def test_opportunities_won_lost_and_open(company):
    opportunities = company.tables["opportunities"]
    won = opportunities["won"].eq(True)
    lost = opportunities["won"].eq(False)
    still_open = opportunities["won"].isna()
    assert won.sum() > 0
    assert lost.sum() > 0
    assert still_open.sum() > 0
    assert opportunities.loc[won, "account_id"].notna().all()
    assert opportunities.loc[~won, "account_id"].isna().all()
    assert opportunities.loc[still_open, "closed_at"].isna().all()
    assert opportunities.loc[~still_open, "closed_at"].notna().all()
    assert (
        opportunities["closed_at"].dropna() >= opportunities.loc[~still_open, "created_at"]
    ).all()
    assert opportunities["opportunity_id"].is_unique


def test_accounts_start_at_the_win(company):
    tables = company.tables
    won = won_opportunities(tables).set_index("account_id")
    accounts = tables["billing_accounts"].set_index("account_id")
    assert set(won.index) == set(accounts.index)
    assert (accounts["started_at"] == won.loc[accounts.index, "closed_at"]).all()
    cancelled = accounts["cancelled_at"].dropna()
    assert (cancelled > accounts.loc[cancelled.index, "started_at"]).all()
    assert (cancelled.dt.day == 1).all()


def test_cancelled_at_is_end_of_last_charge(company):
    tables = company.tables
    charges = tables["invoices"].query("kind == 'charge'")
    last_end = charges.groupby("account_id")["period_end"].max()
    accounts = tables["billing_accounts"].set_index("account_id")
    cancelled = accounts["cancelled_at"].dropna()
    assert len(cancelled) > 100
    assert (cancelled == last_end[cancelled.index]).all()
    active = accounts.index[accounts["cancelled_at"].isna()]
    # An active account has paid for service up to the end: monthly ones to the next boundary.
    assert (last_end[active] >= END_TS).all()


def test_first_charge_prorated_to_month_boundary(company):
    tables = company.tables
    charges = charges_in_order(tables)
    first = charges[charges["number"] == 0].set_index("account_id")
    started = tables["billing_accounts"].set_index("account_id").loc[first.index, "started_at"]
    assert (first["period_start"] == started).all()
    assert (first["period_end"] == month_start(started, 1)).all()
    assert (first["issued_at"] == started).all()

    # Scaled to a full month, the first charge of a monthly account equals its second
    # charge unless seats grew at the boundary. Rounding to cents allows 2 % on tiny charges.
    second = charges[(charges["number"] == 1) & (charges["billing_period"] == "monthly")]
    second = second.set_index("account_id")
    first = first.loc[second.index]
    month_length = first["period_end"] - month_start(first["period_start"])
    fraction = (first["period_end"] - first["period_start"]) / month_length
    ratio = first["amount"] / fraction / second["amount"]
    assert len(ratio) > 500
    assert (ratio <= 1.02).all()
    assert np.median(ratio) == pytest.approx(1.0, abs=1e-3)


def test_later_charges_cover_calendar_months(company):
    charges = charges_in_order(company.tables)
    later = charges[charges["number"] > 0]
    length = months_between(later["period_start"], later["period_end"])
    assert (later["period_start"] == month_start(later["period_start"])).all()
    assert (later["period_end"] == month_start(later["period_end"])).all()
    assert (length == later["billing_period"].map({"monthly": 1, "annual": 12})).all()
    issued_after = later["issued_at"] - later["period_start"]
    assert (issued_after >= pd.Timedelta(0)).all()
    assert (issued_after < pd.Timedelta(hours=4)).all()
    assert (length == 12).sum() > 50


def test_conversion_rate_two_to_eight_percent(long_company, company):
    for simulated in (company, long_company):
        rate = len(won_opportunities(simulated.tables)) / len(simulated.tables["leads"])
        assert 0.02 <= rate <= 0.08
        assert simulated.summary.conversion_rate == pytest.approx(rate)


def test_larger_companies_convert_less_but_pay_more(long_company):
    tables = long_company.tables
    leads = tables["leads"].dropna(subset=["employees"]).set_index("lead_id")
    leads["band"] = size_band(leads["employees"])
    truth = tables["simulation_truth"].set_index("lead_id").join(leads["band"], how="inner")
    won = won_opportunities(tables)
    leads["converted"] = leads.index.isin(won["lead_id"])

    by_band = truth.groupby("band", observed=True)[["p_convert_ever", "expected_ltv"]].mean()
    assert by_band["p_convert_ever"].is_monotonic_decreasing
    assert by_band["expected_ltv"].is_monotonic_increasing
    assert by_band["expected_ltv"].iloc[-1] > 20 * by_band["expected_ltv"].iloc[0]

    observed = leads.groupby("band", observed=True)["converted"].mean()
    assert observed["1-24"] > observed["25-199"] > observed["200-999"] > observed["1000+"]

    revenue = tables["invoices"].groupby("account_id")["amount"].sum()
    account_band = won.set_index("account_id")["lead_id"].map(leads["band"]).dropna()
    revenue_per_account = (
        revenue.reindex(account_band.index).fillna(0).groupby(account_band, observed=True).mean()
    )
    assert revenue_per_account.is_monotonic_increasing
    assert revenue_per_account["1000+"] > 20 * revenue_per_account["1-24"]


def test_monthly_churn_by_plan_within_ranges(long_company):
    churn = monthly_churn_by_plan(long_company.tables)
    assert 0.02 <= churn["starter"] <= 0.05
    assert 0.02 <= churn["growth"] <= 0.05
    assert 0.005 <= churn["business"] <= 0.02
    assert churn["enterprise"] < 0.01
    assert churn["starter"] > churn["growth"] > churn["business"] > churn["enterprise"]


def test_refunds_and_credits_negative_and_later(company):
    invoices = company.tables["invoices"]
    charges = invoices[invoices["kind"] == "charge"]
    assert (charges["amount"] > 0).all()
    assert (charges["cost"] > 0).all()
    for kind in ("refund", "credit"):
        lines = invoices[invoices["kind"] == kind]
        assert len(lines) > 10, kind
        assert (lines["amount"] < 0).all(), kind
        assert (lines["cost"] == 0).all(), kind
        matched = lines.merge(
            charges, on=["account_id", "period_start", "period_end"], suffixes=("", "_charge")
        )
        matched = matched[matched["issued_at"] > matched["issued_at_charge"]]
        assert set(matched["invoice_id"]) == set(lines["invoice_id"]), kind
        assert (-matched["amount"] <= matched["amount_charge"]).all(), kind
        delay = matched["issued_at"] - matched["issued_at_charge"]
        assert delay.between(pd.Timedelta(days=3), pd.Timedelta(days=45)).all(), kind
    assert invoices["invoice_id"].is_unique


def test_gross_margin_65_to_85_percent(company, long_company):
    for simulated in (company, long_company):
        invoices = simulated.tables["invoices"]
        margin = 1 - invoices["cost"].sum() / invoices["amount"].sum()
        assert 0.65 <= margin <= 0.85


def test_discounts_within_plan_ranges(company):
    """Monthly accounts whose charges never changed pay seats x list price x (1 - discount)."""
    tables = company.tables
    charges = charges_in_order(tables)
    later = charges[(charges["number"] > 0) & (charges["billing_period"] == "monthly")]
    per_account = later.groupby("account_id").agg(
        amount=("amount", "first"), prices=("amount", "nunique"), plan=("plan", "first")
    )
    steady = per_account[per_account["prices"] == 1]
    seats = tables["billing_accounts"].set_index("account_id").loc[steady.index, "seats"]
    plans = {plan.name: plan for plan in PLANS}
    list_price = steady["plan"].map({name: plan.list_price for name, plan in plans.items()})
    discount = 1 - steady["amount"] / seats / list_price

    assert len(steady) > 300
    assert (discount > -0.001).all()
    discounted = discount > 0.001
    for name, plan in plans.items():
        in_plan = discount[discounted & (steady["plan"] == name)]
        assert in_plan.between(
            plan.discount_range[0] - 0.001, plan.discount_range[1] + 0.001
        ).all(), name
    share = discounted.groupby(steady["plan"]).mean()
    assert share["starter"] < share["growth"] < share["business"]


def test_expansions_and_reactivations_present(company):
    tables = company.tables
    charges = charges_in_order(tables)
    monthly = charges[(charges["number"] > 0) & (charges["billing_period"] == "monthly")]
    change = monthly.groupby("account_id")["amount"].diff().dropna()
    assert (change > 0).sum() > 20
    # Seats only grow, so a monthly charge never drops unless the account left and came back.
    assert (change >= -0.01).all()

    gap = charges["period_start"] - charges.groupby("account_id")["period_end"].shift()
    assert (gap.dropna() >= pd.Timedelta(0)).all()
    comebacks = charges.loc[gap > pd.Timedelta(days=31), "account_id"].unique()
    assert len(comebacks) > 5
    accounts = tables["billing_accounts"].set_index("account_id")
    assert accounts.loc[comebacks, "cancelled_at"].isna().any()


def test_truth_matches_conversions_within_horizon(long_company):
    tables = long_company.tables
    leads = tables["leads"].set_index("lead_id")
    old = leads.index[leads["created_at"] <= END_TS - pd.Timedelta(days=HORIZON_DAYS)]
    truth = tables["simulation_truth"].set_index("lead_id").loc[old]
    won_at = won_opportunities(tables).set_index("lead_id")["closed_at"]
    converted = (won_at.reindex(old) - leads.loc[old, "created_at"]) <= pd.Timedelta(
        days=HORIZON_DAYS
    )

    p = truth["p_convert_horizon"]
    standard_error = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert (truth["horizon_days"] == HORIZON_DAYS).all()
    assert abs(converted.mean() - p.mean()) < 4 * standard_error


def test_oracle_matches_open_leads_at_age_60(long_company):
    tables = long_company.tables
    age = pd.Timedelta(days=60)
    horizon = pd.Timedelta(days=HORIZON_DAYS)
    leads = tables["leads"].set_index("lead_id")
    leads = leads[leads["created_at"] <= END_TS - age - horizon]
    won_at = won_opportunities(tables).set_index("lead_id")["closed_at"].reindex(leads.index)
    at_age = leads["created_at"] + age
    still_open = ~(won_at <= at_age) & ~(leads["disqualified_at"] <= at_age)
    open_leads = leads.index[still_open]
    converted = won_at[open_leads] <= at_age[open_leads] + horizon

    truth = tables["simulation_truth"].set_index("lead_id").loc[open_leads]
    p = oracle_conversion_probability(truth, 60, HORIZON_DAYS)
    standard_error = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(converted.mean() - p.mean()) < 4 * standard_error
    # Age lowers the chance: early converters have left, slow ones remain.
    assert p.mean() < truth["p_convert_horizon"].mean()


def test_oracle_at_age_zero_is_p_convert_horizon(company):
    truth = company.tables["simulation_truth"]
    p = oracle_conversion_probability(truth, 0, HORIZON_DAYS)
    np.testing.assert_allclose(p, truth["p_convert_horizon"], rtol=1e-12)


def test_oracle_by_hand():
    truth = pd.DataFrame({"p_convert_ever": [0.5, 0.0], "conversion_delay_days_mean": [10.0, 10.0]})
    p = oracle_conversion_probability(truth, np.array([10.0, 10.0]), 10.0)
    converter_open = 0.5 * np.exp(-1)
    non_converter_open = 0.5 * (1 - 0.35 * (1 - np.exp(-10 / 21)))
    expected = converter_open * (1 - np.exp(-1)) / (converter_open + non_converter_open)
    assert p[0] == pytest.approx(expected, rel=1e-12)
    assert p[1] == 0.0


@pytest.mark.parametrize(
    ("age", "horizon", "match"),
    [(-1, 90, "age_days"), (0, 0, "horizon_days"), (np.nan, 90, "age_days")],
)
def test_oracle_rejects_bad_arguments(age, horizon, match):
    truth = pd.DataFrame({"p_convert_ever": [0.1], "conversion_delay_days_mean": [30.0]})
    with pytest.raises(ValueError, match=match):
        oracle_conversion_probability(truth, age, horizon)


def test_expected_ltv_matches_realised_margin(long_company):
    """Accounts from the first year, over their first 60 service months.

    The realised margin of each account's first 60 months (stopping at the first month
    boundary plus 59 months, invoices straddling the cut prorated by time) averages to
    expected_ltv within sampling error. The truth counts the prorated first period as a
    full month and ignores reactivation gaps, small biases that the tolerance covers.
    """
    tables = long_company.tables
    accounts = tables["billing_accounts"].set_index("account_id")
    accounts = accounts[accounts["started_at"] < END_TS - pd.DateOffset(months=61)]
    start_month = accounts["started_at"].dt.tz_localize(None).dt.to_period("M")
    cut = (start_month + 60).dt.to_timestamp().dt.tz_localize("UTC")

    invoices = tables["invoices"].join(cut.rename("cut"), on="account_id", how="inner")
    served_end = invoices[["period_end", "cut"]].min(axis=1)
    inside = (served_end - invoices["period_start"]) / (
        invoices["period_end"] - invoices["period_start"]
    )
    invoices["margin"] = (invoices["amount"] - invoices["cost"]) * inside.clip(0, 1)
    realised = (
        invoices.groupby("account_id")["margin"].sum().reindex(accounts.index, fill_value=0.0)
    )

    won = won_opportunities(tables).set_index("account_id")["lead_id"]
    truth = tables["simulation_truth"].set_index("lead_id")["expected_ltv"]
    expected = truth.reindex(won[accounts.index]).to_numpy()
    difference = realised.to_numpy() - expected
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    assert len(accounts) > 500
    assert abs(difference.mean()) < 4 * standard_error


def first_service_months_margin(lines: dict[str, np.ndarray], cap_months: int) -> pd.Series:
    """Gross margin per account over its first ``cap_months`` months of service.

    ``lines`` contains epoch seconds, as the billing walk returns them. Charges are taken in
    order and the one crossing the cap is prorated. Refunds and credits count with the
    share of the charge whose period they share. Periods here start on month boundaries,
    so their length in months is a whole number.
    """
    frame = pd.DataFrame(lines)
    month = lines["period_start"].astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)
    end_month = lines["period_end"].astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)
    frame["months"] = end_month - month
    charges = frame[frame["kind"] == "charge"].sort_values(["account", "period_start"])
    served_before = charges.groupby("account")["months"].cumsum() - charges["months"]
    charges = charges.assign(inside=((cap_months - served_before) / charges["months"]).clip(0, 1))
    frame = frame.merge(
        charges[["account", "period_start", "inside"]], on=["account", "period_start"]
    )
    margin = (frame["amount"] - frame["cost"]) * frame["inside"]
    return margin.groupby(frame["account"]).sum()


@pytest.mark.parametrize("annual", [False, True], ids=["monthly", "annual"])
@pytest.mark.parametrize("plan", PLANS, ids=[plan.name for plan in PLANS])
def test_expected_ltv_matches_billing_walk(plan, annual):
    """expected_ltv against 20,000 accounts walked through seven years of billing.

    The accounts start on a month boundary, so the first period is a full month, as
    expected_ltv counts it, and the comparison has no known bias. A public simulation
    has too few accounts to see an error of a few percent; this one has enough.
    """
    count = 20_000
    rng = np.random.default_rng(17)
    seats = rng.integers(1, 50, count)
    terms = simulate_module._AccountTerms(
        plan=np.full(count, PLANS.index(plan), dtype=np.int16),
        seats=seats,
        unit_price=plan.list_price * rng.uniform(0.7, 1.0, count),
        list_price=np.full(count, plan.list_price),
        cost_ratio=np.full(count, plan.cost_ratio),
        annual=np.full(count, annual),
        churn_hazard=plan.churn_hazard * rng.uniform(0.5, 1.5, count),
        expansion_share=np.full(count, plan.expansion_share),
    )
    started_s = np.full(count, simulate_module._date_seconds(dt.date(2012, 1, 1)))
    end_s = simulate_module._date_seconds(dt.date(2019, 1, 1))
    charges, _ = simulate_module._simulate_subscriptions(
        np.random.default_rng(1), started_s, terms, end_s
    )
    lines = simulate_module._price_lines(np.random.default_rng(2), charges, terms, end_s)

    realised = first_service_months_margin(lines, simulate_module.LIFETIME_CAP_MONTHS).reindex(
        range(count)
    )
    expected = simulate_module._expected_ltv(terms)
    difference = realised.to_numpy() - expected
    standard_error = difference.std(ddof=1) / np.sqrt(count)
    assert abs(difference.mean()) < 4 * standard_error
    assert standard_error < 0.02 * expected.mean()


def test_same_seed_identical_tables(tmp_path):
    first = read_tables_of(tmp_path / "a.db", seed=7, chunk_rows=200_000)
    again = read_tables_of(tmp_path / "b.db", seed=7, chunk_rows=1_000)
    other = read_tables_of(tmp_path / "c.db", seed=8, chunk_rows=200_000)
    for name in TABLE_ORDER:
        pd.testing.assert_frame_equal(first[name], again[name], obj=name)
    assert not first["leads"].equals(other["leads"])
    assert not first["invoices"].equals(other["invoices"])


def read_tables_of(path: Path, seed: int, chunk_rows: int) -> dict[str, pd.DataFrame]:
    url = f"sqlite:///{path}"
    simulate_company(url, leads=3_000, months=12, seed=seed, end=END, chunk_rows=chunk_rows)
    return read_tables(url)


def test_second_run_replaces_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    simulate_company(url, leads=2_000, months=6, seed=1, end=END)
    summary = simulate_company(url, leads=1_000, months=6, seed=2, end=END)
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            counts = {
                name: connection.execute(
                    sa.select(sa.func.count()).select_from(sa.table(name))
                ).scalar_one()
                for name in TABLE_ORDER
            }
    finally:
        engine.dispose()
    assert counts == summary.row_counts
    assert counts["leads"] == 1_000


def test_end_defaults_to_today(tmp_path):
    before = dt.datetime.now(dt.UTC).date()
    summary = simulate_company(f"sqlite:///{tmp_path / 'w.db'}", leads=200, months=1, seed=1)
    after = dt.datetime.now(dt.UTC).date()
    assert summary.end in (before, after)
    assert summary.row_counts["leads"] == 200


def test_summary_describes_the_run(company):
    text = company.summary.describe()
    assert "20,000 leads" in text
    assert "2023-06-01 to 2025-06-01" in text
    assert f"{company.summary.customers:,}" in text
    assert "warehouse.db" in text
    assert company.summary.seconds > 0
    assert set(company.summary.write_seconds) == set(TABLE_ORDER)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"leads": 0}, ValueError, "leads must be between"),
        ({"months": 0}, ValueError, "months must be between"),
        ({"seed": -1}, ValueError, "seed must be between"),
        ({"leads": 10.5}, TypeError, "leads must be an int"),
        ({"horizon_days": 0}, ValueError, "horizon_days"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows"),
        ({"schema": "bad name"}, ValueError, "schema must be a plain SQL identifier"),
        ({"end": "2025-01-01"}, TypeError, "end must be a datetime.date"),
    ],
)
def test_invalid_arguments_raise(tmp_path, arguments, error, match):
    values = {"leads": 100, "months": 1, "seed": 1, "end": END, **arguments}
    with pytest.raises(error, match=match):
        simulate_company(f"sqlite:///{tmp_path / 'w.db'}", **values)


def test_core_insert_writes_same_rows(tmp_path, monkeypatch):
    """The SQLAlchemy Core path, used for backends other than SQLite and PostgreSQL."""
    executemany = read_tables_of(tmp_path / "a.db", seed=4, chunk_rows=700)
    monkeypatch.setattr(simulate_module, "_insert_method", lambda dialect, driver: "core_insert")
    core = read_tables_of(tmp_path / "b.db", seed=4, chunk_rows=700)
    for name in TABLE_ORDER:
        pd.testing.assert_frame_equal(core[name], executemany[name], obj=name)


def test_progress_bar_reports_rows(tmp_path, capsys):
    simulate_company(
        f"sqlite:///{tmp_path / 'w.db'}", leads=300, months=2, seed=1, end=END, progress=True
    )
    assert "rows" in capsys.readouterr().err


@pytest.mark.postgres
def test_postgres_matches_sqlite(postgres_url, tmp_path):
    arguments = {"leads": 3_000, "months": 12, "seed": 21, "end": END}
    sqlite_summary = simulate_company(f"sqlite:///{tmp_path / 'w.db'}", **arguments)
    postgres_summary = simulate_company(postgres_url, **arguments, chunk_rows=5_000)
    assert postgres_summary.row_counts == sqlite_summary.row_counts

    from_sqlite = read_tables(f"sqlite:///{tmp_path / 'w.db'}")
    from_postgres = read_tables(postgres_url)
    for name in TABLE_ORDER:
        assert len(from_postgres[name]) == len(from_sqlite[name]), name
    leads_columns = ["lead_id", "created_at", "disqualified_at", "employees", "country"]
    pd.testing.assert_frame_equal(
        from_postgres["leads"][leads_columns].sort_values("lead_id", ignore_index=True),
        from_sqlite["leads"][leads_columns].sort_values("lead_id", ignore_index=True),
        check_dtype=False,
    )
    assert from_postgres["invoices"]["amount"].sum() == pytest.approx(
        from_sqlite["invoices"]["amount"].sum()
    )


@pytest.mark.postgres
def test_postgres_schema_created(postgres_url):
    summary = simulate_company(
        postgres_url, leads=500, months=3, seed=2, end=END, schema="simulated"
    )
    engine = create_engine_for(postgres_url)
    try:
        with engine.connect() as connection:
            leads = connection.execute(sa.text("SELECT count(*) FROM simulated.leads")).scalar_one()
            created_at = connection.execute(
                sa.text("SELECT min(created_at) FROM simulated.leads")
            ).scalar_one()
    finally:
        engine.dispose()
    assert leads == summary.row_counts["leads"] == 500
    assert created_at.utcoffset() == dt.timedelta(0)
