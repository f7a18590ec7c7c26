"""Labels: turn billing history into per-account ARPU, gross margin, churn and LTV as of a cutoff.

docs/ltv.md states every rule with a worked example. In short, each invoice line is spread
over its service period by elapsed time, and only service before the cutoff counts. Charges
define when an account is covered, and a gap in coverage longer than the grace period is a
churn event. All amounts stay in the account's own currency.

The pandas functions label frames already in memory. label_accounts_in_warehouse gives the
same labels from the warehouse, with the work per invoice line done in SQL by the queries of
tasks/labels_sql.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection, Engine

from fulcrum.timing import measured
from fulcrum.contract import INVOICE_KINDS
from fulcrum.settings import LtvSettings, Settings
from fulcrum.sqltime import to_epoch_seconds
from fulcrum.warehouse import (
    Warehouse,
    check_source_columns,
    describe_database_error,
    read_only_connection,
    source_selectable,
)
from tasks.extract import SourceFrames
from tasks.labels_sql import BillingQueries, build_billing_queries

ACCOUNT_LTV_COLUMNS = [
    "account_id",
    "segment",
    "currency",
    "months_billed",
    "revenue",
    "cost",
    "arpu",
    "gross_margin",
    "churn_rate",
    "expected_lifetime_months",
    "ltv",
    "is_active",
]
MONTHLY_REVENUE_COLUMNS = ["account_id", "month", "revenue", "cost", "service_months"]
COVERAGE_SPELL_COLUMNS = [
    "account_id",
    "start",
    "end",
    "service_days",
    "churned",
    "active",
]
CHURN_RATE_COLUMNS = [
    "segment",
    "churn_events",
    "months_at_risk",
    "raw_churn_rate",
    "churn_rate",
]
UNKNOWN_SEGMENT = "unknown"

# Descriptions of the data problems that labelling survives, in the words of the WARNING line.
DATA_PROBLEMS = {
    "invoice_missing_values": "invoice lines with a missing id, account, period, issue time, "
    "amount or cost (dropped)",
    "invoice_inverted_period": "invoice lines whose period ends before it starts (dropped)",
    "invoice_duplicate_id": "invoice lines that repeat an invoice_id (all but the first "
    "issued dropped)",
    "invoice_unknown_kind": "invoice lines whose kind is not charge, refund or credit "
    "(counted as revenue, not as service)",
    "invoice_positive_refund": "refund or credit lines with a positive amount (kept as given)",
    "invoice_negative_charge": "charge lines with a negative amount (kept as given)",
    "invoice_unknown_account": "invoice lines for accounts not in billing_accounts before "
    "the cutoff (dropped)",
    "invoice_currency_mismatch": "invoice lines whose currency is missing or differs from "
    "their account's (dropped, because amounts are not converted)",
    "account_missing_values": "billing accounts with a missing account_id, started_at or "
    "currency (dropped)",
    "account_duplicate_id": "billing accounts that repeat an account_id (all but the first "
    "started dropped)",
}

_INVOICE_COLUMNS = [
    "invoice_id",
    "account_id",
    "period_start",
    "period_end",
    "issued_at",
    "amount",
    "cost",
    "currency",
    "kind",
]
_ACCOUNT_COLUMNS = ["account_id", "started_at", "currency"]
_US_PER_DAY = 86_400 * 1_000_000


def _cutoff_us(cutoff: pd.Timestamp) -> int:
    """Return the cutoff as microseconds since the Unix epoch, after checking it is UTC-aware."""
    cutoff = pd.Timestamp(cutoff)
    if cutoff.tzinfo is None:
        raise ValueError(
            "cutoff must be a timezone-aware timestamp, for example "
            f"pd.Timestamp('2024-06-01', tz='UTC'). Got the naive timestamp {cutoff}."
        )
    return (cutoff - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)


def _epoch_us(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Return timestamps as int64 microseconds since the epoch, and a mask of the missing ones.

    Naive timestamps are read as UTC, as the data contract states. Microseconds rather than
    nanoseconds keep far-future sentinels such as 9999-12-31 in range.
    """
    stamps = pd.to_datetime(values, utc=True).dt.tz_localize(None).dt.as_unit("us")
    missing = stamps.isna().to_numpy()
    return stamps.to_numpy().view("int64"), missing


def _require_columns(frame: pd.DataFrame, columns: list[str], source: str) -> pd.DataFrame:
    """Return ``frame``, or raise ValueError when it has rows but lacks a column labelling reads.

    A frame without rows may come without columns, and gets them added empty.
    """
    missing = [column for column in columns if column not in frame.columns]
    if missing and len(frame) > 0:
        raise ValueError(
            f"{source} is missing the columns {missing}. Labelling reads {columns}, so map "
            "these columns in the source settings or fix the extract."
        )
    if missing:
        return frame.reindex(columns=list(frame.columns) + missing)
    return frame


def _prepare_invoices(
    invoices: pd.DataFrame, cutoff_us: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep the invoice lines issued before the cutoff that labelling can use.

    Returns the lines with integer microsecond columns start_us, end_us and issued_us
    added, and the count of each data problem found.
    """
    invoices = _require_columns(invoices, _INVOICE_COLUMNS, "invoices")
    start_us, start_missing = _epoch_us(invoices["period_start"])
    end_us, end_missing = _epoch_us(invoices["period_end"])
    issued_us, issued_missing = _epoch_us(invoices["issued_at"])
    lines = pd.DataFrame(
        {
            "invoice_id": invoices["invoice_id"].to_numpy(),
            "account_id": invoices["account_id"].to_numpy(),
            "currency": invoices["currency"].to_numpy(),
            "kind": invoices["kind"].to_numpy(),
            "amount": pd.to_numeric(invoices["amount"]).to_numpy(dtype="float64"),
            "cost": pd.to_numeric(invoices["cost"]).to_numpy(dtype="float64"),
            "start_us": start_us,
            "end_us": end_us,
            "issued_us": issued_us,
        }
    )

    # A line with no issue time cannot be placed before or after the cutoff, so it is
    # reported whatever its issue time would have been.
    missing = (
        start_missing
        | end_missing
        | issued_missing
        | lines[["invoice_id", "account_id", "amount", "cost"]].isna().any(axis=1).to_numpy()
    )
    visible = ~issued_missing & (issued_us < cutoff_us)
    inverted = ~missing & visible & (end_us < start_us)
    lines = lines[(visible & ~missing & ~inverted)]
    missing = missing & (visible | issued_missing)

    lines = lines.sort_values(["issued_us"], kind="stable")
    duplicate = lines["invoice_id"].duplicated(keep="first")
    lines = lines[~duplicate]

    unknown_kind = ~lines["kind"].isin(INVOICE_KINDS)
    positive_refund = lines["kind"].isin(["refund", "credit"]) & (lines["amount"] > 0)
    negative_charge = (lines["kind"] == "charge") & (lines["amount"] < 0)
    problems = {
        "invoice_missing_values": int(missing.sum()),
        "invoice_inverted_period": int(inverted.sum()),
        "invoice_duplicate_id": int(duplicate.sum()),
        "invoice_unknown_kind": int(unknown_kind.sum()),
        "invoice_positive_refund": int(positive_refund.sum()),
        "invoice_negative_charge": int(negative_charge.sum()),
    }
    lines["account_id"] = lines["account_id"].astype("str")
    return lines.reset_index(drop=True), problems


def _prepare_accounts(
    billing_accounts: pd.DataFrame, cutoff_us: int, segment_column: str
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep one row per billing account started before the cutoff: account_id, segment, currency.

    Returns the accounts and the count of each data problem found.
    """
    if segment_column not in billing_accounts.columns and len(billing_accounts) > 0:
        raise ValueError(
            f"billing_accounts has no column {segment_column!r}, which ltv.segment_column names "
            f"as the segment. Set ltv.segment_column to one of {list(billing_accounts.columns)}."
        )
    billing_accounts = _require_columns(
        billing_accounts, _ACCOUNT_COLUMNS + [segment_column], "billing_accounts"
    )
    started_us, started_missing = _epoch_us(billing_accounts["started_at"])
    accounts = pd.DataFrame(
        {
            "account_id": billing_accounts["account_id"].to_numpy(),
            "segment": billing_accounts[segment_column].to_numpy(),
            "currency": billing_accounts["currency"].to_numpy(),
            "started_us": started_us,
        }
    )

    # As with invoice lines, an account with no start time is reported whenever it started.
    missing = (
        started_missing | accounts[["account_id", "currency"]].isna().any(axis=1).to_numpy()
    )
    started = ~started_missing & (started_us < cutoff_us)
    accounts = accounts[~missing & started]
    missing = missing & (started | started_missing)
    accounts = accounts.sort_values(["started_us"], kind="stable")
    duplicate = accounts["account_id"].duplicated(keep="first")
    accounts = accounts[~duplicate]

    problems = {
        "account_missing_values": int(missing.sum()),
        "account_duplicate_id": int(duplicate.sum()),
    }
    return _normalise_accounts(accounts.drop(columns="started_us")), problems


def _normalise_accounts(accounts: pd.DataFrame) -> pd.DataFrame:
    """Turn ids and currencies into text and blank segments into 'unknown', sorted by account_id."""
    segment = accounts["segment"].astype("str").str.strip()
    accounts["segment"] = segment.mask(segment.isna() | (segment == ""), UNKNOWN_SEGMENT)
    accounts["account_id"] = accounts["account_id"].astype("str")
    accounts["currency"] = accounts["currency"].astype("str")
    accounts = accounts.sort_values("account_id")
    return accounts.reset_index(drop=True)


def _match_lines_to_accounts(
    lines: pd.DataFrame, accounts: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep the invoice lines of known accounts that are billed in the account's currency."""
    account_currency = lines["account_id"].map(accounts.set_index("account_id")["currency"])
    unknown_account = account_currency.isna()
    currency_mismatch = ~unknown_account & (
        lines["currency"].astype("str") != account_currency.astype("str")
    )
    problems = {
        "invoice_unknown_account": int(unknown_account.sum()),
        "invoice_currency_mismatch": int(currency_mismatch.sum()),
    }
    return lines[~unknown_account & ~currency_mismatch], problems


def _month_index(stamps_us: np.ndarray) -> np.ndarray:
    """Return the calendar month (months since 1970-01, UTC) of each microsecond timestamp."""
    return stamps_us.astype("datetime64[us]").astype("datetime64[M]").astype("int64")


def _month_start_us(months: np.ndarray) -> np.ndarray:
    return months.astype("datetime64[M]").astype("datetime64[us]").astype("int64")


def _split_by_month(
    start_us: np.ndarray, end_us: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each non-empty interval [start, end) at UTC month boundaries.

    Returns four arrays with one entry per piece: the position of the interval the piece
    comes from, its month index, the length of the piece and the length of its month, both
    in microseconds.
    """
    first_month = _month_index(start_us)
    last_month = _month_index(end_us - 1)
    piece_counts = last_month - first_month + 1

    source = np.repeat(np.arange(len(start_us)), piece_counts)
    first_piece = np.repeat(np.cumsum(piece_counts) - piece_counts, piece_counts)
    month = first_month[source] + (np.arange(len(source)) - first_piece)

    month_start = _month_start_us(month)
    month_end = _month_start_us(month + 1)
    overlap = np.minimum(end_us[source], month_end) - np.maximum(start_us[source], month_start)
    return source, month, overlap, month_end - month_start


def _months_to_timestamps(months: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(months.astype("datetime64[M]").astype("datetime64[ns]")).tz_localize(
        "UTC"
    )


def _spread_revenue(lines: pd.DataFrame, cutoff_us: int) -> pd.DataFrame:
    """Spread amount and cost over calendar months: one row per account and month."""
    has_period = (lines["end_us"] > lines["start_us"]).to_numpy()
    periodic = lines[has_period & (lines["start_us"] < cutoff_us).to_numpy()]
    start = periodic["start_us"].to_numpy()
    end = periodic["end_us"].to_numpy()

    # The part of a period after the cutoff is service not yet delivered, so it is left out,
    # but the share of each piece is still taken over the whole period.
    source, month, overlap, _ = _split_by_month(start, np.minimum(end, cutoff_us))
    share = overlap / (end - start)[source]

    # A line without a service period is a one-off amount, booked in its month of issue.
    one_off = lines[~has_period]
    spread = pd.DataFrame(
        {
            "account_id": np.concatenate(
                [periodic["account_id"].to_numpy()[source], one_off["account_id"].to_numpy()]
            ),
            "month": np.concatenate([month, _month_index(one_off["issued_us"].to_numpy())]),
            "revenue": np.concatenate(
                [periodic["amount"].to_numpy()[source] * share, one_off["amount"].to_numpy()]
            ),
            "cost": np.concatenate(
                [periodic["cost"].to_numpy()[source] * share, one_off["cost"].to_numpy()]
            ),
        }
    )
    return spread.groupby(["account_id", "month"], as_index=False, sort=False).sum()


def _merge_spells(lines: pd.DataFrame, cutoff_us: int, grace_days: int) -> pd.DataFrame:
    """Merge charge periods into spells of continuous service: one row per account and spell.

    Columns: account_id, start_us, end_us (the whole visible spell, which may run past the
    cutoff), service_us (the part before the cutoff), churned and active.

    NOTE: only charges make coverage. A refund for the unused rest of a period does not end
    the spell early, and billing_accounts.cancelled_at is not read. So an account that
    cancels mid-term with a prorated refund counts as covered, at lower ARPU, until the
    charged period ends, and its churn event is dated to that end.
    """
    charges = lines[(lines["kind"] == "charge") & (lines["end_us"] > lines["start_us"])]
    charges = charges.sort_values(["account_id", "start_us"], kind="stable")

    # A charge opens a new spell when it starts after every earlier charge of the account
    # has ended, so overlapping and back-to-back periods join one spell.
    reach = charges.groupby("account_id", sort=False)["end_us"].cummax()
    earlier_reach = reach.groupby(charges["account_id"], sort=False).shift(
        1, fill_value=np.iinfo(np.int64).min
    )
    spell_number = (charges["start_us"] > earlier_reach).cumsum()
    spells = charges.groupby(spell_number.to_numpy(), sort=True).agg(
        account_id=("account_id", "first"),
        start_us=("start_us", "min"),
        end_us=("end_us", "max"),
    )
    return _mark_spells(spells, cutoff_us, grace_days)


def _mark_spells(spells: pd.DataFrame, cutoff_us: int, grace_days: int) -> pd.DataFrame:
    """Add churned, active and service_us to spells sorted by account_id and start_us."""
    grace_us = grace_days * _US_PER_DAY
    next_start = spells.groupby("account_id", sort=False)["start_us"].shift(
        -1, fill_value=np.iinfo(np.int64).max
    )
    resumes_in_grace = next_start <= spells["end_us"] + grace_us
    grace_over = spells["end_us"] + grace_us < cutoff_us
    spells["churned"] = ~resumes_in_grace & grace_over
    spells["active"] = (spells["start_us"] < cutoff_us) & ~grace_over
    spells["service_us"] = (np.minimum(spells["end_us"], cutoff_us) - spells["start_us"]).clip(
        lower=0
    )
    return spells.reset_index(drop=True)


def _coverage_by_month(spells: pd.DataFrame) -> pd.DataFrame:
    """Return the fraction of each calendar month that a spell covers before the cutoff."""
    served = spells[spells["service_us"] > 0]
    start = served["start_us"].to_numpy()
    source, month, overlap, month_length = _split_by_month(
        start, start + served["service_us"].to_numpy()
    )
    coverage = pd.DataFrame(
        {
            "account_id": served["account_id"].to_numpy()[source],
            "month": month,
            "service_months": overlap / month_length,
        }
    )
    return coverage.groupby(["account_id", "month"], as_index=False, sort=False).sum()


def _monthly_revenue(lines: pd.DataFrame, spells: pd.DataFrame, cutoff_us: int) -> pd.DataFrame:
    """Join spread revenue and coverage: one row per account and month with any of either."""
    monthly = _spread_revenue(lines, cutoff_us).merge(
        _coverage_by_month(spells), on=["account_id", "month"], how="outer"
    )
    monthly[["revenue", "cost", "service_months"]] = monthly[
        ["revenue", "cost", "service_months"]
    ].fillna(0.0)
    return monthly.sort_values(["account_id", "month"]).reset_index(drop=True)


def monthly_revenue(invoices: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Spread the invoice lines issued before ``cutoff`` over calendar months.

    Returns one row per account and UTC calendar month with revenue or service before the
    cutoff. ``month`` is the month's first instant. ``revenue`` and ``cost`` are the net
    amounts that fall in the month, in invoice currency. ``service_months`` is the fraction
    of the month, 0 to 1, that charges cover.
    """
    cutoff_us = _cutoff_us(cutoff)
    lines, _ = _prepare_invoices(invoices, cutoff_us)
    spells = _merge_spells(lines, cutoff_us, grace_days=0)
    monthly = _monthly_revenue(lines, spells, cutoff_us)
    return pd.DataFrame(
        {
            "account_id": monthly["account_id"].astype("str"),
            "month": _months_to_timestamps(monthly["month"].to_numpy(dtype="int64")),
            "revenue": monthly["revenue"].astype("float64"),
            "cost": monthly["cost"].astype("float64"),
            "service_months": monthly["service_months"].astype("float64"),
        },
        columns=MONTHLY_REVENUE_COLUMNS,
    )


def coverage_spells(invoices: pd.DataFrame, cutoff: pd.Timestamp, grace_days: int) -> pd.DataFrame:
    """Merge the charges issued before ``cutoff`` into spells of continuous paid service.

    Returns one row per account and spell. ``start`` and ``end`` bound the spell as far as
    the visible charges reach, which may be past the cutoff. ``service_days`` is the part
    before the cutoff. ``churned`` is True when the spell ended more than ``grace_days``
    before the cutoff and no charge resumes service within ``grace_days`` of its end.
    ``active`` is True when the spell started before the cutoff and had not ended more than
    ``grace_days`` before it.
    """
    cutoff_us = _cutoff_us(cutoff)
    lines, _ = _prepare_invoices(invoices, cutoff_us)
    spells = _merge_spells(lines, cutoff_us, grace_days)
    return pd.DataFrame(
        {
            "account_id": spells["account_id"].astype("str"),
            "start": pd.to_datetime(spells["start_us"], unit="us", utc=True),
            "end": pd.to_datetime(spells["end_us"], unit="us", utc=True),
            "service_days": spells["service_us"] / _US_PER_DAY,
            "churned": spells["churned"].astype("bool"),
            "active": spells["active"].astype("bool"),
        },
        columns=COVERAGE_SPELL_COLUMNS,
    )


def churn_rates(accounts: pd.DataFrame, prior_months: float) -> pd.DataFrame:
    """Pool account churn into one monthly churn rate per segment, smoothed toward the overall rate.

    ``accounts`` has one row per account with ``segment``, ``churn_events`` and
    ``months_billed`` (the covered months at risk). Returns one row per segment with
    ``churn_events``, ``months_at_risk``, ``raw_churn_rate`` (events per covered month)
    and ``churn_rate`` = (events + prior_months x overall rate) / (months + prior_months).
    A rate whose denominator is zero is NaN.
    """
    by_segment = accounts.groupby("segment", as_index=False, sort=True).agg(
        churn_events=("churn_events", "sum"),
        months_at_risk=("months_billed", "sum"),
    )
    events = by_segment["churn_events"].astype("float64")
    months = by_segment["months_at_risk"].astype("float64")

    total_months = months.sum()
    overall_rate = events.sum() / total_months if total_months > 0 else np.nan
    smoothed_months = months + prior_months
    by_segment["raw_churn_rate"] = (events / months).where(months > 0)
    by_segment["churn_rate"] = ((events + prior_months * overall_rate) / smoothed_months).where(
        smoothed_months > 0
    )
    by_segment["churn_events"] = by_segment["churn_events"].astype("int64")
    by_segment["months_at_risk"] = months
    return by_segment[CHURN_RATE_COLUMNS]


def expected_lifetime_months(churn_rate: pd.Series, cap_months: float) -> pd.Series:
    """Turn a monthly churn rate c into the expected months of service within the cap.

    The lifetime is the geometric sum of the survival to each month,
    (1 - (1 - c) ** cap_months) / c, which is at most cap_months. A churn rate of zero
    gives cap_months, a rate of 1 or more gives 1 month, and NaN gives NaN.
    """
    churn_rate = churn_rate.astype("float64")
    probability = churn_rate.clip(upper=1.0)
    # expm1 and log1p keep the sum accurate when the churn rate is tiny.
    churning = probability.where((probability > 0) & (probability < 1))
    lifetime = -np.expm1(cap_months * np.log1p(-churning)) / churning
    lifetime = lifetime.mask(probability == 0, cap_months).mask(probability >= 1, 1.0)
    return lifetime.where(churn_rate.notna())


def _empty_account_ltv() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "account_id": pd.Series([], dtype="str"),
            "segment": pd.Series([], dtype="str"),
            "currency": pd.Series([], dtype="str"),
        }
    )
    for column in ACCOUNT_LTV_COLUMNS[3:-1]:
        frame[column] = pd.Series([], dtype="float64")
    frame["is_active"] = pd.Series([], dtype="bool")
    return frame


def _summarise_accounts(
    accounts: pd.DataFrame, monthly: pd.DataFrame, spells: pd.DataFrame
) -> pd.DataFrame:
    """Add each account's totals: revenue, cost, months_billed, service_days, churn_events and
    is_active."""
    money = monthly.groupby("account_id").agg(
        revenue=("revenue", "sum"),
        cost=("cost", "sum"),
        months_billed=("service_months", "sum"),
    )
    return _join_account_totals(accounts, money, spells)


def _join_account_totals(
    accounts: pd.DataFrame, money: pd.DataFrame, spells: pd.DataFrame
) -> pd.DataFrame:
    """Add ``money`` (revenue, cost and months_billed, indexed by account_id) and the spell
    totals to each account, with zeros for an account that has neither."""
    service = spells.groupby("account_id").agg(
        service_us=("service_us", "sum"),
        churn_events=("churned", "sum"),
        is_active=("active", "any"),
    )
    summary = accounts.join(money, on="account_id").join(service, on="account_id")
    summary[["revenue", "cost", "months_billed", "service_us"]] = summary[
        ["revenue", "cost", "months_billed", "service_us"]
    ].fillna(0.0)
    summary["service_days"] = summary["service_us"] / _US_PER_DAY
    summary["churn_events"] = summary["churn_events"].fillna(0).astype("int64")
    summary["is_active"] = summary["is_active"].fillna(False).astype("bool")
    return summary.drop(columns="service_us")


def _value_accounts(summary: pd.DataFrame, ltv: LtvSettings) -> pd.DataFrame:
    """Add arpu, gross_margin, churn_rate, expected_lifetime_months and ltv to each account."""
    revenue = summary["revenue"]
    months = summary["months_billed"]
    enough_history = (summary["service_days"] >= ltv.min_history_days) & (months > 0)
    summary["arpu"] = (revenue / months.where(months > 0)).where(enough_history)
    summary["gross_margin"] = ((revenue - summary["cost"]) / revenue.where(revenue > 0)).astype(
        "float64"
    )

    rates = churn_rates(summary, ltv.churn_prior_months).set_index("segment")["churn_rate"]
    summary["churn_rate"] = summary["segment"].map(rates).astype("float64")
    summary["expected_lifetime_months"] = expected_lifetime_months(
        summary["churn_rate"], ltv.lifetime_cap_months
    )
    summary["ltv"] = summary["arpu"] * summary["gross_margin"] * summary["expected_lifetime_months"]
    return summary


def _label_accounts(
    billing_accounts: pd.DataFrame,
    invoices: pd.DataFrame,
    cutoff: pd.Timestamp,
    ltv: LtvSettings,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Label every account and count the data problems survived on the way."""
    cutoff_us = _cutoff_us(cutoff)
    accounts, account_problems = _prepare_accounts(
        billing_accounts, cutoff_us, ltv.segment_column
    )
    lines, invoice_problems = _prepare_invoices(invoices, cutoff_us)
    lines, match_problems = _match_lines_to_accounts(lines, accounts)
    problems = {**invoice_problems, **match_problems, **account_problems}
    if accounts.empty:
        return _empty_account_ltv(), problems

    spells = _merge_spells(lines, cutoff_us, ltv.churn_grace_days)
    monthly = _monthly_revenue(lines, spells, cutoff_us)
    summary = _summarise_accounts(accounts, monthly, spells)
    return _order_labels(_value_accounts(summary, ltv)), problems


def _order_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """Keep the account_ltv columns, sorted by account_id, with float64 numbers."""
    labels = labels[ACCOUNT_LTV_COLUMNS].sort_values("account_id").reset_index(drop=True)
    float_columns = ACCOUNT_LTV_COLUMNS[3:-1]
    labels[float_columns] = labels[float_columns].astype("float64")
    return labels


def label_accounts(
    billing_accounts: pd.DataFrame,
    invoices: pd.DataFrame,
    cutoff: pd.Timestamp,
    ltv: LtvSettings,
) -> pd.DataFrame:
    """Label each billing account started before ``cutoff`` with ARPU, margin, churn and LTV.

    Returns the ``account_ltv`` frame: one row per account, sorted by account_id, with the
    columns in ACCOUNT_LTV_COLUMNS. Money is in the account's own currency. ARPU is per
    month of service and LTV per expected lifetime. Only invoices issued before the cutoff, and only
    the service they cover before it, count, so a later invoice never changes the labels
    for an earlier cutoff. docs/ltv.md gives the rules.
    """
    labels, _ = _label_accounts(billing_accounts, invoices, cutoff, ltv)
    return labels


def find_data_problems(
    billing_accounts: pd.DataFrame,
    invoices: pd.DataFrame,
    cutoff: pd.Timestamp,
    ltv: LtvSettings,
) -> dict[str, int]:
    """Count the rows that ``label_accounts`` drops or reads with care, by kind of problem.

    The keys are those of DATA_PROBLEMS, and every key is present.
    """
    cutoff_us = _cutoff_us(cutoff)
    accounts, account_problems = _prepare_accounts(
        billing_accounts, cutoff_us, ltv.segment_column
    )
    lines, invoice_problems = _prepare_invoices(invoices, cutoff_us)
    _, match_problems = _match_lines_to_accounts(lines, accounts)
    return {**invoice_problems, **match_problems, **account_problems}


def label_accounts_in_warehouse(
    engine: Engine, settings: Settings, cutoff: pd.Timestamp
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Label every billing account as of ``cutoff``, adding up the invoice lines in the warehouse.

    Returns the ``account_ltv`` frame and the count of each data problem, as
    ``_label_accounts`` does for the billing_accounts and invoices sources of
    ``settings.sources`` read whole. The database applies the cutoff and the dropping rules,
    sums each account's revenue and cost and merges the coverage spells, so Python reads
    one row per account and spell. Money and months match the pandas path to a relative
    1e-9, because the sums run in another order and SQLite rounds times to milliseconds.

    Raises ValueError for a naive cutoff, a segment column that billing_accounts lacks, a
    timestamp column that contains other text, or, on PostgreSQL, an amount or cost that is not
    a number. Raises SourceMappingError for a source without a contract column.
    """
    cutoff_us = _cutoff_us(cutoff)
    if settings.sources["billing_accounts"].absent or settings.sources["invoices"].absent:
        return _empty_account_ltv(), dict.fromkeys(DATA_PROBLEMS, 0)

    billing_accounts = _select_source(engine, settings, "billing_accounts")
    invoices = _select_source(engine, settings, "invoices")
    with read_only_connection(engine) as connection:
        segment_column = _find_segment_column(
            connection, billing_accounts, settings.ltv.segment_column
        )
        queries = build_billing_queries(
            billing_accounts, invoices, segment_column, to_epoch_seconds(cutoff)
        )
        history = _read_billing_history(connection, queries.history)
        parts = dict(tuple(history.groupby("part", sort=False)))
        problems = _check_data_problems(connection, queries, parts["problems"].iloc[0])

    empty = history.iloc[:0]
    account_rows = parts.get("account", empty)[["account_id", "segment", "currency"]]
    accounts = _normalise_accounts(account_rows.copy())
    if accounts.empty:
        return _empty_account_ltv(), problems

    spells = _spells_from_history(
        parts.get("spell", empty), cutoff_us, settings.ltv.churn_grace_days
    )
    coverage = _coverage_by_month(spells).sort_values(["account_id", "month"])
    money = parts.get("money", empty).set_index("account_id")[["revenue", "cost"]]
    money["months_billed"] = coverage.groupby("account_id")["service_months"].sum()
    summary = _join_account_totals(accounts, money, spells)
    return _order_labels(_value_accounts(summary, settings.ltv)), problems


def _select_source(engine: Engine, settings: Settings, name: str) -> sa.FromClause:
    selectable = source_selectable(engine, name, settings.sources[name])
    check_source_columns(name, selectable)
    return selectable


def _find_segment_column(
    connection: Connection, billing_accounts: sa.FromClause, segment_column: str
) -> str | None:
    """Return ``segment_column``, or None when the source lacks it and has no rows.

    Raises ValueError when the source lacks it and has rows, as the pandas path does.
    """
    names = [column.name for column in billing_accounts.columns]
    if segment_column in names:
        return segment_column
    probe = sa.select(sa.literal(1)).select_from(billing_accounts).limit(1)
    if connection.execute(probe).first() is None:
        return None
    raise ValueError(
        f"billing_accounts has no column {segment_column!r}, which ltv.segment_column names "
        f"as the segment. Set ltv.segment_column to one of {names}."
    )


def _check_data_problems(
    connection: Connection, queries: BillingQueries, counts: pd.Series
) -> dict[str, int]:
    """Return the count of each data problem, after checking that no timestamp column
    contains other text."""
    for name, (source, column, examples_query) in queries.unparsable.items():
        if counts[name] > 0:
            examples = _execute(connection, examples_query).scalars().all()
            raise ValueError(
                f"{source}.{column} has {int(counts[name])} values that are not timestamps, for "
                f"example {examples}. Store ISO 8601 timestamps in UTC there, or convert the "
                f"column in the SQL mapping of {source}."
            )
    return {name: int(counts[name]) for name in DATA_PROBLEMS}


def _read_billing_history(connection: Connection, query: sa.CompoundSelect) -> pd.DataFrame:
    """Read the rows of ``BillingQueries.history``, with money and times as floats."""
    result = _execute(connection, query)
    # pandas built a frame of 18,000 plain tuples ten times faster than one of as many
    # SQLAlchemy Row objects, because it probes the attributes of each Row.
    history = pd.DataFrame([tuple(row) for row in result], columns=list(result.keys()))
    numbers = ["revenue", "cost", "spell_start", "spell_end"]
    history[numbers] = history[numbers].astype("float64")
    return history


def _execute(
    connection: Connection, query: sa.Select | sa.CompoundSelect
) -> sa.CursorResult:
    try:
        return connection.execute(query)
    except sa.exc.DataError as exc:
        # PostgreSQL rejects a cast of text that is not a timestamp or a number.
        raise ValueError(
            f"billing_accounts or invoices contain a value that labelling cannot read: "
            f"{describe_database_error(exc)}. Store timestamps in the timestamp columns and "
            f"numbers in amount and cost, or convert them in the source's SQL mapping."
        ) from exc


def _spells_from_history(rows: pd.DataFrame, cutoff_us: int, grace_days: int) -> pd.DataFrame:
    """Turn spell rows with times in epoch seconds into marked spells in integer microseconds."""
    spells = pd.DataFrame(
        {
            "account_id": rows["account_id"].astype("str").to_numpy(),
            "start_us": np.round(rows["spell_start"].to_numpy() * 1e6).astype("int64"),
            "end_us": np.round(rows["spell_end"].to_numpy() * 1e6).astype("int64"),
        }
    )
    spells = spells.sort_values(["account_id", "start_us"], kind="stable")
    return _mark_spells(spells.reset_index(drop=True), cutoff_us, grace_days)


def describe_median_ltv(account_ltv: pd.DataFrame) -> str:
    """Return the median LTV of each currency as text, for example 'EUR 1200.00, USD 950.50'."""
    medians = account_ltv.dropna(subset=["ltv"]).groupby("currency")["ltv"].median()
    if medians.empty:
        return "none"
    return ", ".join(f"{currency} {value:.2f}" for currency, value in medians.items())


# A cache key would hash every invoice, which costs more than labelling them, so the task is
# never cached. It reads no external system, so it is not retried either.
@task(name="label-accounts", cache_policy=NO_CACHE)
@measured
def label_accounts_task(
    frames: SourceFrames, cutoff: pd.Timestamp, ltv: LtvSettings
) -> pd.DataFrame:
    """Label the billing accounts in ``frames`` as of ``cutoff`` and log what was labelled.

    ``label_accounts`` documents the labels. Data problems are logged, not raised.
    """
    account_ltv, problems = _label_accounts(
        frames.billing_accounts, frames.invoices, cutoff, ltv
    )
    report_labels(account_ltv, problems, cutoff)
    return account_ltv


@task(name="label-accounts-in-warehouse", cache_policy=NO_CACHE)
@measured
def label_accounts_in_warehouse_task(
    warehouse: Warehouse, cutoff: pd.Timestamp, settings: Settings
) -> pd.DataFrame:
    """Label the billing accounts as of ``cutoff``, adding up invoice lines in the warehouse.

    The labels equal those of ``label_accounts_task``; only one row per account and coverage
    spell reaches Python. Data problems are logged, not raised.
    """
    account_ltv, problems = label_accounts_in_warehouse(warehouse.engine, settings, cutoff)
    report_labels(account_ltv, problems, cutoff)
    return account_ltv


def report_labels(account_ltv: pd.DataFrame, problems: dict[str, int], cutoff: pd.Timestamp) -> None:
    """Log the data problems that labelling survived and a summary of the labels."""
    logger = get_run_logger()
    found = {name: count for name, count in problems.items() if count > 0}
    if found:
        logger.warning(
            "Billing history as of %s has data problems that labelling survived: %s",
            cutoff,
            "; ".join(f"{count} {DATA_PROBLEMS[name]}" for name, count in found.items()),
        )
    logger.info(
        "Labelled %d billing accounts in %d segments as of %s: %d active, %d with an LTV, "
        "median LTV %s",
        len(account_ltv),
        account_ltv["segment"].nunique(),
        cutoff,
        int(account_ltv["is_active"].sum()),
        int(account_ltv["ltv"].notna().sum()),
        describe_median_ltv(account_ltv),
    )
