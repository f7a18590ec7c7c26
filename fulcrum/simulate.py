"""Simulate a B2B SaaS company: the five source tables plus the ground truth behind them.

Every lead gets a latent intent and a latent account (plan, seats, discount, billing
period, churn hazard) when it is created. Intent drives both its activity and its
conversion, so activity is informative; the latent account drives what the lead is worth
if it converts. The generator is vectorised with numpy: the only Python loops run over
fixed-size blocks of leads and over calendar months, never over single leads or accounts.
docs/simulator.md gives the model in formulas and the benchmark.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from tqdm import tqdm

from fulcrum.contract import define_source_tables, define_truth_table
from fulcrum.settings import redact_url, validate_identifier
from fulcrum.warehouse import create_engine_for

logger = logging.getLogger(__name__)

DAY_SECONDS = 86_400
LIFETIME_CAP_MONTHS = 60  # the default ltv.lifetime_cap_months of the labels
CURRENCY = "USD"

# Leads that never convert are disqualified with this probability, after an exponential
# delay. Converters never are. The oracle needs both numbers, so they are fixed here.
DISQUALIFIED_SHARE = 0.35
DISQUALIFY_DELAY_DAYS_MEAN = 21.0

REACTIVATION_SHARE = 0.15
REFUND_SHARE = 0.015
CREDIT_SHARE = 0.02
# Expected share of charged revenue that is refunded or credited. Half of the refunds
# return the whole charge and the rest U(0.2, 0.8) of it. Credits return U(0.05, 0.20).
EXPECTED_GIVEBACK = REFUND_SHARE * (0.5 + 0.5 * 0.5) + CREDIT_SHARE * 0.125
ANNUAL_PREPAY_DISCOUNT = 0.15
EXPANSION_FRACTION = (0.05, 0.30)

# Conversion model: logit(p_convert_ever) = base + intent weight * intent
#   + size weight * ln(employees / 25) + industry effect + region effect + country effect
CONVERSION_BASE_LOGIT = -3.35
INTENT_WEIGHT = 1.0
SIZE_WEIGHT = -0.3
# Mean days from creation to won: base * (employees / 25) ** exponent * exp(-speed * intent)
DELAY_BASE_DAYS = 28.0
DELAY_SIZE_EXPONENT = 0.3
DELAY_INTENT_SPEED = 0.25

# Background activity: intensity rate * exp(intent weight * intent) * exp(-age / decay)
# events a day, from creation until conversion, disqualification or the end.
ACTIVITY_RATE_PER_DAY = 0.08
ACTIVITY_INTENT_WEIGHT = 0.8
ACTIVITY_DECAY_DAYS = 40.0
# Events are drawn per fixed block of leads with one random stream each, so memory stays
# bounded and the rows do not depend on chunk_rows.
EVENT_BLOCK_LEADS = 131_072

EVENT_TYPES = (
    "page_view",
    "pricing_page_view",
    "content_download",
    "email_click",
    "webinar",
    "demo_request",
    "trial_start",
)
# Per event type, in EVENT_TYPES order: the share at intent 0 and the log-odds slope on
# intent. The last three are the mixes before a win, after a win and after a disqualification.
_EVENT_BASE_SHARE = np.array([0.45, 0.10, 0.15, 0.20, 0.05, 0.03, 0.02])
_EVENT_INTENT_SLOPE = np.array([0.0, 0.6, 0.2, 0.1, 0.3, 0.9, 0.8])
_EVENT_BURST_SHARE = np.array([0.25, 0.25, 0.0, 0.10, 0.05, 0.20, 0.15])
_EVENT_AFTER_WIN_SHARE = np.array([0.6, 0.0, 0.2, 0.0, 0.2, 0.0, 0.0])
_EVENT_AFTER_DISQUALIFY_SHARE = np.array([0.7, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0])

# name, share of leads, intent shift, shift of ln(employees), churn hazard multiplier
_CHANNELS = (
    ("organic", 0.27, 0.0, 0.0, 1.0),
    ("paid_search", 0.20, 0.1, 0.0, 1.0),
    ("paid_social", 0.16, -0.4, -0.3, 1.15),
    ("referral", 0.08, 0.7, 0.1, 0.85),
    ("events", 0.07, 0.3, 0.5, 1.0),
    ("outbound", 0.16, -0.2, 0.9, 1.05),
    ("partner", 0.06, 0.5, 0.3, 0.9),
)
# name, share, conversion logit effect
_INDUSTRIES = (
    ("software", 0.22, 0.3),
    ("financial_services", 0.12, 0.0),
    ("healthcare", 0.10, -0.2),
    ("manufacturing", 0.12, -0.1),
    ("retail", 0.10, -0.1),
    ("education", 0.07, -0.3),
    ("media", 0.07, 0.1),
    ("professional_services", 0.12, 0.1),
    ("logistics", 0.08, -0.1),
)
# name, share, intent shift
_SENIORITIES = (
    ("ic", 0.30, -0.3),
    ("manager", 0.30, 0.0),
    ("director", 0.20, 0.2),
    ("vp", 0.10, 0.3),
    ("c_level", 0.10, 0.4),
)
# name, share, conversion logit effect, countries as (ISO code, share within region, effect)
_REGIONS = (
    ("north_america", 0.48, 0.1, (("US", 0.85, 0.05), ("CA", 0.15, 0.0))),
    (
        "emea",
        0.30,
        0.0,
        (
            ("GB", 0.28, 0.0),
            ("DE", 0.24, 0.15),
            ("FR", 0.16, -0.1),
            ("NL", 0.10, 0.1),
            ("ES", 0.08, -0.1),
            ("SE", 0.07, 0.1),
            ("IE", 0.07, 0.0),
        ),
    ),
    (
        "apac",
        0.15,
        -0.15,
        (
            ("AU", 0.35, 0.1),
            ("IN", 0.25, -0.3),
            ("SG", 0.15, 0.1),
            ("JP", 0.15, -0.2),
            ("NZ", 0.10, 0.0),
        ),
    ),
    (
        "latam",
        0.07,
        -0.25,
        (("BR", 0.5, 0.0), ("MX", 0.3, 0.0), ("AR", 0.1, -0.2), ("CL", 0.1, 0.1)),
    ),
)
# Share of leads whose CRM record lacks the column.
_MISSING_SHARE = {
    "industry": 0.04,
    "employees": 0.07,
    "region": 0.02,
    "country": 0.05,
    "seniority": 0.06,
}


@dataclass(frozen=True)
class _Plan:
    name: str
    min_employees: int
    list_price: float  # USD per seat per month
    cost_ratio: float  # cost to serve as a share of list price
    discount_share: float
    discount_range: tuple[float, float]
    annual_share: float
    churn_hazard: float  # monthly, before the per-account multipliers
    expansion_share: float  # chance per service month that seats grow


PLANS = (
    _Plan("starter", 1, 29.0, 0.24, 0.10, (0.05, 0.20), 0.15, 0.042, 0.010),
    _Plan("growth", 25, 49.0, 0.22, 0.25, (0.05, 0.20), 0.25, 0.032, 0.020),
    _Plan("business", 200, 79.0, 0.20, 0.50, (0.10, 0.25), 0.50, 0.015, 0.025),
    _Plan("enterprise", 1000, 109.0, 0.17, 0.80, (0.15, 0.35), 0.75, 0.004, 0.030),
)

_STREAM_LEADS, _STREAM_EVENTS, _STREAM_BILLING, _STREAM_OPPORTUNITIES = 1, 2, 3, 4
_NO_TIME = np.iinfo(np.int64).max
_PENDING, _ACTIVE, _PAUSED, _CANCELLED = 0, 1, 2, 3

TABLE_ORDER = (
    "leads",
    "lead_events",
    "opportunities",
    "billing_accounts",
    "invoices",
    "simulation_truth",
)


@dataclass
class SimulationSummary:
    """Row counts, headline figures and timings of one simulate_company run."""

    url: str
    seed: int
    leads: int
    months: int
    start: dt.date
    end: dt.date
    horizon_days: int
    row_counts: dict[str, int]
    customers: int
    conversion_rate: float
    mean_expected_ltv: float
    revenue: float
    generate_seconds: float = 0.0
    write_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> str:
        """Return a few lines for people: what was written where, and the headline figures."""
        counts = ", ".join(f"{name} {count:,}" for name, count in self.row_counts.items())
        return "\n".join(
            [
                f"Simulated {self.leads:,} leads from {self.start} to {self.end} "
                f"(seed {self.seed}) into {self.url}",
                f"Rows: {counts}",
                f"Customers: {self.customers:,} ({self.conversion_rate:.2%} of leads), "
                f"mean expected LTV {self.mean_expected_ltv:,.0f} {CURRENCY}, "
                f"net invoiced {self.revenue:,.0f} {CURRENCY}",
                f"Took {self.seconds:.1f} s ({self.generate_seconds:.1f} s generating, "
                f"{sum(self.write_seconds.values()):.1f} s writing)",
            ]
        )


def simulate_company(
    url: str,
    leads: int,
    months: int,
    seed: int,
    end: dt.date | None = None,
    horizon_days: int = 90,
    chunk_rows: int = 200_000,
    progress: bool = False,
    schema: str | None = None,
) -> SimulationSummary:
    """Simulate a company and replace the five source tables and the truth table at ``url``.

    Lead arrivals span the ``months`` calendar months before ``end`` (default: today's UTC
    date); every timestamp written is before ``end`` at 00:00 UTC. The same
    ``(seed, leads, months, end)`` always gives the same rows; ``horizon_days`` changes
    only the truth table's ``p_convert_horizon``, and ``chunk_rows`` only the write batches.
    """
    _check_arguments(leads, months, seed, horizon_days, chunk_rows, schema)
    if end is None:
        end = dt.datetime.now(dt.UTC).date()
    started = time.perf_counter()

    company = generate_company(
        leads=leads, months=months, seed=seed, end=end, horizon_days=horizon_days
    )
    generate_seconds = time.perf_counter() - started

    engine = create_engine_for(url)
    try:
        tables = _recreate_tables(engine, schema)
        write_seconds = _write_company(engine, tables, company, chunk_rows, progress)
    finally:
        engine.dispose()

    summary = _summarise(company, url, seed, leads, months, end, horizon_days)
    summary.generate_seconds = generate_seconds
    summary.write_seconds = write_seconds
    summary.seconds = time.perf_counter() - started
    logger.info(
        "Simulated %d leads, %d customers (%.2f%%), %d invoice lines into %s in %.1f s",
        leads,
        summary.customers,
        100 * summary.conversion_rate,
        summary.row_counts["invoices"],
        summary.url,
        summary.seconds,
    )
    return summary


def oracle_conversion_probability(
    truth: pd.DataFrame, age_days: float | np.ndarray, horizon_days: float
) -> np.ndarray:
    """Return the probability that a lead open at ``age_days`` wins within ``horizon_days``.

    One value per truth row. Open means neither converted nor disqualified. The
    probability is conditional on the lead's latent parameters only: a model that also
    reads activity can beat it on single leads, because demo requests and trials cluster
    in the weeks before a win.
    """
    age = np.broadcast_to(np.asarray(age_days, dtype=float), (len(truth),))
    invalid = ~np.isfinite(age) | (age < 0)
    if invalid.any():
        raise ValueError(
            f"age_days must be finite and >= 0. Got {float(age[invalid][0])} "
            f"({int(invalid.sum())} invalid of {len(age)})."
        )
    if not np.isfinite(horizon_days) or horizon_days <= 0:
        raise ValueError(f"horizon_days must be a positive number of days. Got {horizon_days!r}.")

    p_ever = truth["p_convert_ever"].to_numpy(dtype=float)
    delay_mean = truth["conversion_delay_days_mean"].to_numpy(dtype=float)
    converter_open = p_ever * np.exp(-age / delay_mean)
    disqualified_by_age = DISQUALIFIED_SHARE * -np.expm1(-age / DISQUALIFY_DELAY_DAYS_MEAN)
    non_converter_open = (1.0 - p_ever) * (1.0 - disqualified_by_age)
    wins_in_horizon = converter_open * -np.expm1(-horizon_days / delay_mean)
    return wins_in_horizon / (converter_open + non_converter_open)


def generate_company(
    leads: int, months: int, seed: int, end: dt.date, horizon_days: int = 90
) -> dict[str, dict[str, np.ndarray]]:
    """Generate every table in memory: table name -> column name -> numpy array.

    Timestamps are ``datetime64[s]`` in UTC with NaT for NULL, nullable integers are
    float64 with NaN, and strings are object arrays with None.
    """
    _check_arguments(leads, months, seed, horizon_days, chunk_rows=1, schema=None)
    window = _Window.ending(end, months)
    rng_leads = _rng(seed, _STREAM_LEADS)

    created = _draw_arrivals(rng_leads, leads, window)
    profile = _draw_profiles(rng_leads, leads)
    latent = _draw_latent(rng_leads, profile)
    outcome = _draw_outcomes(rng_leads, created, latent, window.end_s)
    account_terms = _draw_account_terms(rng_leads, profile, latent)

    lead_ids = _format_ids("L", leads)
    tables: dict[str, dict[str, np.ndarray]] = {}
    tables["leads"] = _leads_table(lead_ids, created, profile, outcome, window.end_s)
    tables["lead_events"] = _generate_events(seed, lead_ids, created, latent, outcome, window.end_s)
    tables["opportunities"], account_leads = _generate_opportunities(
        _rng(seed, _STREAM_OPPORTUNITIES), lead_ids, created, latent, outcome, window.end_s
    )
    tables["billing_accounts"], tables["invoices"] = _generate_billing(
        _rng(seed, _STREAM_BILLING), account_leads, outcome, account_terms, window.end_s
    )
    tables["simulation_truth"] = _truth_table(lead_ids, latent, account_terms, horizon_days)
    return tables


def _check_arguments(
    leads: int, months: int, seed: int, horizon_days: int, chunk_rows: int, schema: str | None
) -> None:
    checks = (
        # NOTE: every table is built in memory before writing, about 0.8 GiB per million
        # leads (measured at one million), so the upper limit needs about 16 GiB.
        ("leads", leads, 1, 20_000_000),
        ("months", months, 1, 240),
        ("seed", seed, 0, 2**63 - 1),
        ("horizon_days", horizon_days, 1, 3650),
        ("chunk_rows", chunk_rows, 1, 10_000_000),
    )
    for name, value, low, high in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int. Got {type(value).__name__} {value!r}.")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low:,} and {high:,}. Got {value!r}.")
    if schema is not None:
        validate_identifier(schema, "schema")


@dataclass(frozen=True)
class _Window:
    """The simulated period [start, end) as calendar dates and UTC epoch seconds."""

    start: dt.date
    end: dt.date
    start_s: int
    end_s: int

    @classmethod
    def ending(cls, end: dt.date, months: int) -> "_Window":
        if isinstance(end, dt.datetime) or not isinstance(end, dt.date):
            raise TypeError(f"end must be a datetime.date. Got {type(end).__name__} {end!r}.")
        start = (pd.Timestamp(end) - pd.DateOffset(months=months)).date()
        return cls(start, end, _date_seconds(start), _date_seconds(end))


def _date_seconds(day: dt.date) -> int:
    return int(np.datetime64(day, "D").astype("datetime64[s]").astype(np.int64))


def _month_index(seconds: np.ndarray) -> np.ndarray:
    """Months since 1970-01 of each UTC epoch second."""
    return (
        np.asarray(seconds, dtype=np.int64)
        .astype("datetime64[s]")
        .astype("datetime64[M]")
        .astype(np.int64)
    )


def _month_start(month_index: np.ndarray | int) -> np.ndarray:
    """UTC epoch seconds of the first instant of each month index."""
    return (
        np.asarray(month_index, dtype=np.int64)
        .astype("datetime64[M]")
        .astype("datetime64[s]")
        .astype(np.int64)
    )


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    # One independent stream per component keeps each table stable when another changes.
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *keys]))


def _format_ids(prefix: str, count: int) -> np.ndarray:
    """Return prefix + zero-padded 1..count as an object array of str.

    Joining precomputed high and low halves is several times faster than formatting
    millions of IDs one by one.
    """
    width = max(8, len(str(count)))
    low_width = 4
    numbers = np.arange(1, count + 1, dtype=np.int64)
    high = numbers // 10**low_width
    low_parts = np.array([f"{i:0{low_width}d}" for i in range(10**low_width)], dtype=object)
    high_parts = np.array(
        [f"{prefix}{i:0{width - low_width}d}" for i in range(int(high.max(initial=0)) + 1)],
        dtype=object,
    )
    return high_parts[high] + low_parts[numbers % 10**low_width]


def _choose(rng: np.random.Generator, shares, size: int) -> np.ndarray:
    shares = np.asarray(shares, dtype=float)
    return rng.choice(len(shares), size=size, p=shares / shares.sum()).astype(np.int16)


def _stochastic_round(values: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    # Rounding up with probability equal to the fraction keeps the expectation exact.
    return np.floor(values + uniform).astype(np.int64)


@dataclass
class _Profile:
    """Lead attributes as category codes, with employees as the true head count."""

    channel: np.ndarray
    industry: np.ndarray
    seniority: np.ndarray
    region: np.ndarray
    country: np.ndarray
    employees: np.ndarray
    missing: dict[str, np.ndarray]


@dataclass
class _Latent:
    intent: np.ndarray
    p_convert_ever: np.ndarray
    delay_mean_days: np.ndarray
    churn_multiplier: np.ndarray


@dataclass
class _Outcome:
    converts_s: np.ndarray  # win time, _NO_TIME for leads that never convert
    disqualified_s: np.ndarray  # _NO_TIME when never disqualified


@dataclass
class _AccountTerms:
    """The account each lead would become, drawn for every lead at creation."""

    plan: np.ndarray
    seats: np.ndarray
    unit_price: np.ndarray  # USD per seat-month after discounts
    list_price: np.ndarray
    cost_ratio: np.ndarray
    annual: np.ndarray
    churn_hazard: np.ndarray
    expansion_share: np.ndarray


def _draw_arrivals(rng: np.random.Generator, leads: int, window: _Window) -> np.ndarray:
    """Draw sorted creation times: 2 % more a month, fewer at weekends, in August and December."""
    days = np.arange(window.start_s // DAY_SECONDS, window.end_s // DAY_SECONDS, dtype=np.int64)
    elapsed_months = (days - days[0]) / 30.44
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday, so Monday is 0
    weekday_factor = np.where(weekday >= 5, 0.3, 1.0)
    month_of_year = days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12
    season_factor = np.select([month_of_year == 7, month_of_year == 11], [0.85, 0.8], 1.0)
    weights = np.exp(0.02 * elapsed_months) * weekday_factor * season_factor
    per_day = rng.multinomial(leads, weights / weights.sum())

    # Working hours of the Americas and Europe overlap in the afternoon UTC.
    hour_weights = np.array(
        [2, 1, 1, 1, 1, 1, 2, 3, 5, 7, 8, 9, 10, 11, 12, 12, 11, 10, 8, 6, 5, 4, 3, 2]
    )
    hours = _choose(rng, hour_weights, leads).astype(np.int64)
    seconds = np.repeat(days, per_day) * DAY_SECONDS + hours * 3600 + rng.integers(0, 3600, leads)
    return np.sort(seconds)


def _draw_profiles(rng: np.random.Generator, leads: int) -> _Profile:
    _, channel_shares, _, channel_size, _ = zip(*_CHANNELS, strict=True)
    channel = _choose(rng, channel_shares, leads)
    industry = _choose(rng, [row[1] for row in _INDUSTRIES], leads)
    seniority = _choose(rng, [row[1] for row in _SENIORITIES], leads)
    region = _choose(rng, [row[1] for row in _REGIONS], leads)

    country = np.zeros(leads, dtype=np.int16)
    offset = 0
    for code, (_, _, _, countries) in enumerate(_REGIONS):
        in_region = region == code
        country[in_region] = offset + _choose(rng, [c[1] for c in countries], int(in_region.sum()))
        offset += len(countries)

    # Log-normal head count: the median lead works at a company of about 30 people, about
    # 11 % at more than 200 and 1.5 % at 1,000 or more (channels shift the median).
    log_size = np.log(25.0) + np.asarray(channel_size)[channel] + 1.6 * rng.standard_normal(leads)
    employees = np.clip(np.round(np.exp(log_size)), 1, 250_000)

    missing = {name: rng.random(leads) < share for name, share in _MISSING_SHARE.items()}
    return _Profile(channel, industry, seniority, region, country, employees, missing)


def _draw_latent(rng: np.random.Generator, profile: _Profile) -> _Latent:
    leads = len(profile.channel)
    channel_intent = np.array([row[2] for row in _CHANNELS])
    seniority_intent = np.array([row[2] for row in _SENIORITIES])
    intent = (
        channel_intent[profile.channel]
        + seniority_intent[profile.seniority]
        + rng.standard_normal(leads)
    )

    industry_effect = np.array([row[2] for row in _INDUSTRIES])
    region_effect = np.array([row[2] for row in _REGIONS])
    country_effect = np.array([c[2] for row in _REGIONS for c in row[3]])
    log_relative_size = np.log(profile.employees / 25.0)
    logit = (
        CONVERSION_BASE_LOGIT
        + INTENT_WEIGHT * intent
        + SIZE_WEIGHT * log_relative_size
        + industry_effect[profile.industry]
        + region_effect[profile.region]
        + country_effect[profile.country]
    )
    p_convert_ever = 1.0 / (1.0 + np.exp(-logit))

    delay_mean_days = np.clip(
        DELAY_BASE_DAYS
        * np.exp(DELAY_SIZE_EXPONENT * log_relative_size - DELAY_INTENT_SPEED * intent),
        3.0,
        400.0,
    )

    # Mean-one log-normal frailty on top of the channel's multiplier.
    channel_churn = np.array([row[4] for row in _CHANNELS])
    frailty = np.exp(0.3 * rng.standard_normal(leads) - 0.045)
    return _Latent(
        intent, p_convert_ever, delay_mean_days, channel_churn[profile.channel] * frailty
    )


def _draw_outcomes(
    rng: np.random.Generator, created: np.ndarray, latent: _Latent, end_s: int
) -> _Outcome:
    """Draw win and disqualification times, which may fall after the end and stay unseen."""
    leads = len(created)
    converts = rng.random(leads) < latent.p_convert_ever
    delay_s = rng.exponential(latent.delay_mean_days) * DAY_SECONDS
    converts_s = np.where(converts, created + delay_s.astype(np.int64), _NO_TIME)

    disqualified = ~converts & (rng.random(leads) < DISQUALIFIED_SHARE)
    disqualify_s = (rng.exponential(DISQUALIFY_DELAY_DAYS_MEAN, leads) * DAY_SECONDS).astype(
        np.int64
    )
    disqualified_s = np.where(disqualified, created + disqualify_s, _NO_TIME)
    return _Outcome(converts_s, disqualified_s)


def _draw_account_terms(
    rng: np.random.Generator, profile: _Profile, latent: _Latent
) -> _AccountTerms:
    leads = len(profile.channel)
    # The plan follows head count with some noise, so a few leads buy a size up or down.
    plan_score = np.log(profile.employees) + 0.25 * rng.standard_normal(leads)
    thresholds = np.log([plan.min_employees for plan in PLANS[1:]])
    plan = np.searchsorted(thresholds, plan_score, side="right").astype(np.int16)

    def per_plan(attribute: str) -> np.ndarray:
        return np.array([getattr(p, attribute) for p in PLANS], dtype=float)[plan]

    seats = np.maximum(
        1,
        _stochastic_round(
            profile.employees**0.75 * rng.uniform(0.25, 0.8, leads), rng.random(leads)
        ),
    )
    discount_low = np.array([p.discount_range[0] for p in PLANS])[plan]
    discount_high = np.array([p.discount_range[1] for p in PLANS])[plan]
    discounted = rng.random(leads) < per_plan("discount_share")
    discount = np.where(discounted, rng.uniform(discount_low, discount_high), 0.0)
    annual = rng.random(leads) < per_plan("annual_share")

    list_price = per_plan("list_price")
    unit_price = list_price * (1.0 - discount) * np.where(annual, 1.0 - ANNUAL_PREPAY_DISCOUNT, 1.0)
    churn_hazard = np.clip(per_plan("churn_hazard") * latent.churn_multiplier, 0.001, 0.3)
    return _AccountTerms(
        plan=plan,
        seats=seats,
        unit_price=unit_price,
        list_price=list_price,
        cost_ratio=per_plan("cost_ratio"),
        annual=annual,
        churn_hazard=churn_hazard,
        expansion_share=per_plan("expansion_share"),
    )


def _leads_table(
    lead_ids: np.ndarray, created: np.ndarray, profile: _Profile, outcome: _Outcome, end_s: int
) -> dict[str, np.ndarray]:
    def names(rows, codes, column: str) -> np.ndarray:
        values = np.array([row[0] for row in rows], dtype=object)[codes]
        values[profile.missing[column]] = None
        return values

    countries = np.array([c[0] for row in _REGIONS for c in row[3]], dtype=object)[profile.country]
    countries[profile.missing["country"]] = None
    employees = profile.employees.copy()
    employees[profile.missing["employees"]] = np.nan
    return {
        "lead_id": lead_ids,
        "created_at": _timestamps(created),
        "channel": np.array([row[0] for row in _CHANNELS], dtype=object)[profile.channel],
        "industry": names(_INDUSTRIES, profile.industry, "industry"),
        "employees": employees,
        "region": names(_REGIONS, profile.region, "region"),
        "seniority": names(_SENIORITIES, profile.seniority, "seniority"),
        "disqualified_at": _timestamps(outcome.disqualified_s, end_s),
        "country": countries,
    }


def _timestamps(seconds: np.ndarray, end_s: int | None = None) -> np.ndarray:
    """Convert epoch seconds to datetime64[s], NaT for _NO_TIME or, given end_s, at or after it."""
    values = np.asarray(seconds, dtype=np.int64)
    unknown = values == _NO_TIME if end_s is None else values >= end_s
    out = values.astype("datetime64[s]")
    out[unknown] = np.datetime64("NaT")
    return out


def _generate_events(
    seed: int,
    lead_ids: np.ndarray,
    created: np.ndarray,
    latent: _Latent,
    outcome: _Outcome,
    end_s: int,
) -> dict[str, np.ndarray]:
    """Generate activity events in fixed blocks of leads, each block with its own random stream."""
    parts = []
    for block, first in enumerate(range(0, len(created), EVENT_BLOCK_LEADS)):
        rows = slice(first, first + EVENT_BLOCK_LEADS)
        lead_index, event_type, occurred = _block_events(
            _rng(seed, _STREAM_EVENTS, block),
            created[rows],
            latent.intent[rows],
            outcome.converts_s[rows],
            outcome.disqualified_s[rows],
            end_s,
        )
        parts.append((lead_index + first, event_type, occurred))

    lead_index = np.concatenate([p[0] for p in parts])
    event_type = np.concatenate([p[1] for p in parts])
    occurred = np.concatenate([p[2] for p in parts])
    order = np.lexsort((event_type, lead_index, occurred))
    return {
        "lead_id": lead_ids[lead_index[order]],
        "event_type": np.array(EVENT_TYPES, dtype=object)[event_type[order]],
        "occurred_at": occurred[order].astype("datetime64[s]"),
    }


def _block_events(
    rng: np.random.Generator,
    created: np.ndarray,
    intent: np.ndarray,
    converts_s: np.ndarray,
    disqualified_s: np.ndarray,
    end_s: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    leads = len(created)
    converts = converts_s != _NO_TIME
    disqualified = disqualified_s != _NO_TIME

    # Background activity decays with lead age and stops at a win or a disqualification.
    stop_s = np.minimum(np.minimum(converts_s, disqualified_s), end_s)
    open_days = (stop_s - created) / DAY_SECONDS
    reach = -np.expm1(-open_days / ACTIVITY_DECAY_DAYS)
    rate = ACTIVITY_RATE_PER_DAY * np.exp(ACTIVITY_INTENT_WEIGHT * intent)
    counts = rng.poisson(rate * ACTIVITY_DECAY_DAYS * reach)
    background = np.repeat(np.arange(leads), counts)
    age_days = -ACTIVITY_DECAY_DAYS * np.log1p(-rng.random(len(background)) * reach[background])
    background_s = created[background] + (age_days * DAY_SECONDS).astype(np.int64)
    background_type = _draw_event_types(rng, intent[background])

    # A burst of late-funnel activity in the three weeks before each win.
    converter = np.flatnonzero(converts)
    burst_counts = 1 + rng.poisson(2.5, len(converter))
    burst = np.repeat(converter, burst_counts)
    burst_days = np.minimum(21.0, (converts_s[burst] - created[burst]) / DAY_SECONDS)
    burst_s = converts_s[burst] - (rng.random(len(burst)) * burst_days * DAY_SECONDS).astype(
        np.int64
    )
    burst_type = _choose(rng, _EVENT_BURST_SHARE, len(burst))

    # A little activity in the two weeks after a win or a disqualification.
    after_win = np.repeat(converter, rng.poisson(1.0, len(converter)))
    after_win_s = converts_s[after_win] + (rng.random(len(after_win)) * 14 * DAY_SECONDS).astype(
        np.int64
    )
    after_win_type = _choose(rng, _EVENT_AFTER_WIN_SHARE, len(after_win))
    dropped = np.flatnonzero(disqualified)
    after_dq = np.repeat(dropped, rng.poisson(0.2, len(dropped)))
    after_dq_s = disqualified_s[after_dq] + (rng.random(len(after_dq)) * 14 * DAY_SECONDS).astype(
        np.int64
    )
    after_dq_type = _choose(rng, _EVENT_AFTER_DISQUALIFY_SHARE, len(after_dq))

    lead_index = np.concatenate([background, burst, after_win, after_dq])
    event_type = np.concatenate([background_type, burst_type, after_win_type, after_dq_type])
    occurred = np.concatenate([background_s, burst_s, after_win_s, after_dq_s])
    seen = occurred < end_s
    return lead_index[seen].astype(np.int64), event_type[seen].astype(np.int8), occurred[seen]


def _draw_event_types(rng: np.random.Generator, intent: np.ndarray) -> np.ndarray:
    """Draw event types whose mix shifts towards pricing, demos and trials as intent rises."""
    weights = _EVENT_BASE_SHARE * np.exp(np.outer(intent, _EVENT_INTENT_SLOPE))
    cumulative = np.cumsum(weights, axis=1)
    threshold = rng.random(len(intent)) * cumulative[:, -1]
    return (cumulative < threshold[:, None]).sum(axis=1).astype(np.int8)


def _generate_opportunities(
    rng: np.random.Generator,
    lead_ids: np.ndarray,
    created: np.ndarray,
    latent: _Latent,
    outcome: _Outcome,
    end_s: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Build one opportunity per converter and per engaged non-converter.

    Returns the table and the won leads in account order.
    """
    leads = len(created)
    converts = outcome.converts_s != _NO_TIME
    disqualified = outcome.disqualified_s != _NO_TIME
    uniform = rng.random((3, leads))

    # Converters: sales opens the deal part-way through the journey and closes it at the win.
    journey_s = np.where(converts, outcome.converts_s - created, 0)
    won_open_s = created + (journey_s * (0.3 + 0.6 * uniform[0])).astype(np.int64)

    # High-intent non-converters often reach a deal that is later lost.
    engaged = ~converts & (uniform[1] < 1.0 / (1.0 + np.exp(2.8 - latent.intent)))
    dq_journey_s = np.where(disqualified, outcome.disqualified_s - created, 0)
    lost_open_s = np.where(
        disqualified,
        created + (dq_journey_s * (0.1 + 0.7 * uniform[2])).astype(np.int64),
        created + (rng.gamma(2.0, 15.0, leads) * DAY_SECONDS).astype(np.int64),
    )
    lost_close_s = np.where(
        disqualified,
        outcome.disqualified_s,
        lost_open_s + (rng.gamma(2.0, 22.5, leads) * DAY_SECONDS).astype(np.int64),
    )

    has_deal = converts | engaged
    opened_s = np.where(converts, won_open_s, lost_open_s)
    closed_s = np.where(converts, outcome.converts_s, lost_close_s)
    visible = has_deal & (opened_s < end_s)
    lead_index = np.flatnonzero(visible)
    lead_index = lead_index[np.lexsort((lead_index, opened_s[lead_index]))]

    closed = closed_s[lead_index] < end_s
    won = converts[lead_index] & closed
    won_leads = lead_index[won]
    # Accounts are numbered in order of their start, which is the win time.
    won_order = np.lexsort((won_leads, outcome.converts_s[won_leads]))
    account_ids = np.full(len(lead_index), None, dtype=object)
    account_ids[np.flatnonzero(won)[won_order]] = _format_ids("A", len(won_leads))
    won_flag = np.full(len(lead_index), None, dtype=object)
    won_flag[closed] = won[closed]

    table = {
        "opportunity_id": _format_ids("O", len(lead_index)),
        "lead_id": lead_ids[lead_index],
        "account_id": account_ids,
        "created_at": _timestamps(opened_s[lead_index]),
        "closed_at": _timestamps(closed_s[lead_index], end_s),
        "won": won_flag,
    }
    return table, won_leads[won_order]


def _generate_billing(
    rng: np.random.Generator,
    account_leads: np.ndarray,
    outcome: _Outcome,
    all_terms: _AccountTerms,
    end_s: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Build the accounts of the won leads and their invoice lines up to the end."""
    terms = _AccountTerms(**{name: value[account_leads] for name, value in vars(all_terms).items()})
    started_s = outcome.converts_s[account_leads]
    charges, state = _simulate_subscriptions(rng, started_s, terms, end_s)
    lines = _price_lines(rng, charges, terms, end_s)

    count = len(account_leads)
    account_ids = _format_ids("A", count)
    cancelled_s = np.where(
        np.isin(state["status"], (_PAUSED, _CANCELLED)),
        _month_start(state["churned_month"]),
        _NO_TIME,
    )
    accounts = {
        "account_id": account_ids,
        "started_at": _timestamps(started_s),
        "cancelled_at": _timestamps(cancelled_s),
        "plan": np.array([p.name for p in PLANS], dtype=object)[terms.plan],
        "currency": np.full(count, CURRENCY, dtype=object),
        "seats": state["seats"],
        "billing_period": np.where(terms.annual, "annual", "monthly").astype(object),
    }
    invoices = {
        "invoice_id": _format_ids("INV", len(lines["account"])),
        "account_id": account_ids[lines["account"]],
        "period_start": _timestamps(lines["period_start"]),
        "period_end": _timestamps(lines["period_end"]),
        "issued_at": _timestamps(lines["issued"]),
        "amount": lines["amount"],
        "cost": lines["cost"],
        "currency": np.full(len(lines["account"]), CURRENCY, dtype=object),
        "kind": lines["kind"],
    }
    return accounts, invoices


def _simulate_subscriptions(
    rng: np.random.Generator, started_s: np.ndarray, terms: _AccountTerms, end_s: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Walk all accounts through the month boundaries before the end at once.

    Returns the charge periods (account, start, end, seats, months billed) and the final
    state per account. The first charge runs from the start to the next month boundary.
    Month-to-month accounts may churn at every boundary. Annual accounts are committed
    for their first year and may churn at each renewal. A churned account comes back
    after a gap of two or more months with probability REACTIVATION_SHARE.
    """
    count = len(started_s)
    first_month = _month_index(started_s) + 1
    first_boundary_s = _month_start(first_month)
    month_length_s = first_boundary_s - _month_start(first_month - 1)
    periods = [
        (
            np.arange(count),
            started_s,
            first_boundary_s,
            terms.seats.copy(),
            (first_boundary_s - started_s) / month_length_s,
        )
    ]

    status = np.full(count, _PENDING, dtype=np.int8)
    seats = terms.seats.copy()
    renewal = np.full(count, -1, dtype=np.int64)
    restart = np.full(count, -1, dtype=np.int64)
    churned_month = np.full(count, -1, dtype=np.int64)
    annual = terms.annual
    decision_hazard = np.where(
        annual, -np.expm1(12 * np.log1p(-terms.churn_hazard)), terms.churn_hazard
    )

    last_month = int(_month_index(np.int64(end_s - 1)))
    for month in range(int(first_month.min(initial=last_month + 1)), last_month + 1):
        churn_draw, comeback_draw, expand_draw, fraction_draw, round_draw = rng.random((5, count))
        gap = 2 + rng.poisson(2.0, count)

        entering = (status == _PENDING) & (first_month == month)
        status[entering] = _ACTIVE
        deciding = (status == _ACTIVE) & (~annual | (renewal == month))
        churning = deciding & (churn_draw < decision_hazard)
        pausing = churning & (comeback_draw < REACTIVATION_SHARE)
        status[churning] = _CANCELLED
        status[pausing] = _PAUSED
        restart[pausing] = month + gap[pausing]
        churned_month[churning] = month
        restarting = (status == _PAUSED) & (restart == month)
        status[restarting] = _ACTIVE

        in_service = status == _ACTIVE
        expanding = in_service & (expand_draw < terms.expansion_share)
        fraction = (
            EXPANSION_FRACTION[0] + (EXPANSION_FRACTION[1] - EXPANSION_FRACTION[0]) * fraction_draw
        )
        added = _stochastic_round(seats * fraction, round_draw)
        seats[expanding] += added[expanding]

        billed_monthly = np.flatnonzero(in_service & ~annual)
        billed_annual = np.flatnonzero(
            in_service & annual & (entering | restarting | (renewal == month))
        )
        renewal[billed_annual] = month + 12
        boundary_s = int(_month_start(month))
        for billed, length in ((billed_monthly, 1), (billed_annual, 12)):
            periods.append(
                (
                    billed,
                    np.full(len(billed), boundary_s),
                    np.full(len(billed), int(_month_start(month + length))),
                    seats[billed].copy(),
                    np.full(len(billed), float(length)),
                )
            )

    names = ("account", "period_start", "period_end", "seats", "months")
    charges = {name: np.concatenate([p[i] for p in periods]) for i, name in enumerate(names)}
    state = {"status": status, "seats": seats, "churned_month": churned_month}
    return charges, state


def _price_lines(
    rng: np.random.Generator, charges: dict[str, np.ndarray], terms: _AccountTerms, end_s: int
) -> dict[str, np.ndarray]:
    """Price the charges and add later refunds and credits, keeping lines issued before the end."""
    account = charges["account"]
    count = len(account)
    first_charge = np.zeros(count, dtype=bool)
    first_charge[: len(terms.seats)] = True
    # The first charge is issued at the start, later ones within four hours of the boundary.
    issued = np.where(
        first_charge,
        charges["period_start"],
        charges["period_start"] + rng.integers(0, 4 * 3600, count),
    )
    # A first period of a few minutes would round to zero, so every line is at least a cent.
    seat_months = charges["seats"] * charges["months"]
    amount = _cents(terms.unit_price[account] * seat_months)
    cost = _cents(
        terms.list_price[account]
        * terms.cost_ratio[account]
        * seat_months
        * rng.uniform(0.9, 1.1, count)
    )

    draw = rng.random(count)
    refunded = np.flatnonzero(draw < REFUND_SHARE)
    credited = np.flatnonzero((draw >= REFUND_SHARE) & (draw < REFUND_SHARE + CREDIT_SHARE))
    refund_share = np.where(
        rng.random(len(refunded)) < 0.5, 1.0, rng.uniform(0.2, 0.8, len(refunded))
    )
    refund_issued = issued[refunded] + (rng.uniform(3, 45, len(refunded)) * DAY_SECONDS).astype(
        np.int64
    )
    credit_share = rng.uniform(0.05, 0.20, len(credited))
    credit_issued = issued[credited] + (rng.uniform(5, 30, len(credited)) * DAY_SECONDS).astype(
        np.int64
    )

    source = np.concatenate([np.arange(count), refunded, credited])
    kind = np.concatenate(
        [
            np.zeros(count, np.int8),
            np.ones(len(refunded), np.int8),
            np.full(len(credited), 2, np.int8),
        ]
    )
    line_issued = np.concatenate([issued, refund_issued, credit_issued])
    line_amount = np.concatenate(
        [
            amount,
            -_cents(amount[refunded] * refund_share),
            -_cents(amount[credited] * credit_share),
        ]
    )
    line_cost = np.concatenate([cost, np.zeros(len(refunded) + len(credited))])

    keep = np.flatnonzero(line_issued < end_s)
    keep = keep[np.lexsort((kind[keep], account[source[keep]], line_issued[keep]))]
    return {
        "account": account[source[keep]],
        "period_start": charges["period_start"][source[keep]],
        "period_end": charges["period_end"][source[keep]],
        "issued": line_issued[keep],
        "amount": line_amount[keep],
        "cost": line_cost[keep],
        "kind": np.array(["charge", "refund", "credit"], dtype=object)[kind[keep]],
    }


def _cents(amounts: np.ndarray) -> np.ndarray:
    return np.maximum(np.round(amounts, 2), 0.01)


def _truth_table(
    lead_ids: np.ndarray, latent: _Latent, terms: _AccountTerms, horizon_days: int
) -> dict[str, np.ndarray]:
    p_horizon = latent.p_convert_ever * -np.expm1(-horizon_days / latent.delay_mean_days)
    return {
        "lead_id": lead_ids,
        "p_convert_ever": latent.p_convert_ever,
        "conversion_delay_days_mean": latent.delay_mean_days,
        "p_convert_horizon": p_horizon,
        "expected_ltv": _expected_ltv(terms),
        "horizon_days": np.full(len(lead_ids), horizon_days, dtype=np.int64),
    }


def _expected_ltv(terms: _AccountTerms, cap_months: int = LIFETIME_CAP_MONTHS) -> np.ndarray:
    """Compute the expected gross margin in USD over each account's first ``cap_months`` months.

    Months count service, not calendar time. Service month 0 is the prorated first period,
    counted as a full month. Month n follows month n - 1 with probability
    1 - h * (1 - REACTIVATION_SHARE), because a churn that is later reactivated only shifts
    the remaining months. Seats grow by a factor
    1 + g per service month in expectation. Month-to-month accounts are billed every
    month. Annual ones are billed for 12 months at a time at the seats of the period's
    first month. Their first year is committed, and they may only leave at a renewal.
    """
    margin_month = terms.seats * (
        terms.unit_price * (1.0 - EXPECTED_GIVEBACK) - terms.list_price * terms.cost_ratio
    )
    growth = 1.0 + terms.expansion_share * np.mean(EXPANSION_FRACTION)
    hazard = terms.churn_hazard * (1.0 - REACTIVATION_SHARE)

    monthly_months = _geometric_sum((1.0 - hazard) * growth, cap_months)

    year_leave = -np.expm1(12 * np.log1p(-terms.churn_hazard)) * (1.0 - REACTIVATION_SHARE)
    year_ratio = (1.0 - year_leave) * growth**12
    full_years, extra_months = divmod(cap_months - 1, 12)
    annual_months = 1.0 + growth * (
        12 * _geometric_sum(year_ratio, full_years) + extra_months * year_ratio**full_years
    )
    return margin_month * np.where(terms.annual, annual_months, monthly_months)


def _geometric_sum(ratio: np.ndarray, terms: int) -> np.ndarray:
    """Sum of ratio**k for k in 0..terms-1, stable when ratio is close to 1."""
    ratio = np.asarray(ratio, dtype=float)
    near_one = np.abs(ratio - 1.0) < 1e-9
    safe = np.where(near_one, 0.5, ratio)
    return np.where(near_one, float(terms), -np.expm1(terms * np.log(safe)) / (1.0 - safe))


def _recreate_tables(engine: Engine, schema: str | None) -> dict[str, sa.Table]:
    metadata = sa.MetaData()
    tables = dict(define_source_tables(metadata, schema=schema))
    tables["simulation_truth"] = define_truth_table(metadata, schema=schema)
    if schema is not None and engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
    metadata.drop_all(engine, checkfirst=True)
    metadata.create_all(engine)
    return tables


def _write_company(
    engine: Engine,
    tables: dict[str, sa.Table],
    company: dict[str, dict[str, np.ndarray]],
    chunk_rows: int,
    progress: bool,
) -> dict[str, float]:
    """Write every table in chunks of ``chunk_rows`` and return the seconds spent per table."""
    total = sum(len(next(iter(columns.values()))) for columns in company.values())
    seconds: dict[str, float] = {}
    with tqdm(
        total=total, unit="rows", unit_scale=True, desc="simulate", disable=not progress
    ) as bar:
        for name in TABLE_ORDER:
            started = time.perf_counter()
            bar.set_postfix_str(name)
            for written in _insert_columns(engine, tables[name], company[name], chunk_rows):
                bar.update(written)
            seconds[name] = time.perf_counter() - started
            logger.debug("Wrote %s in %.1f s", name, seconds[name])
    return seconds


def _insert_columns(
    engine: Engine, table: sa.Table, columns: dict[str, np.ndarray], chunk_rows: int
) -> Iterator[int]:
    """Insert the columns with one transaction per chunk, yielding the rows written by each."""
    method = _insert_method(engine.dialect.name, engine.dialect.driver)
    if method == "sqlite_executemany":
        yield from _insert_sqlite(engine, table, columns, chunk_rows)
    elif method == "postgresql_copy":
        yield from _insert_postgresql_copy(engine, table, columns, chunk_rows)
    else:
        yield from _insert_core(engine, table, columns, chunk_rows)


def _insert_method(dialect: str, driver: str) -> str:
    if dialect == "sqlite":
        return "sqlite_executemany"
    if dialect == "postgresql" and driver == "psycopg":
        return "postgresql_copy"
    return "core_insert"


def _chunks(
    columns: dict[str, np.ndarray], names: list[str], chunk_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    rows = len(columns[names[0]])
    for first in range(0, rows, chunk_rows):
        yield {name: columns[name][first : first + chunk_rows] for name in names}


def _insert_sqlite(
    engine: Engine, table: sa.Table, columns: dict[str, np.ndarray], chunk_rows: int
) -> Iterator[int]:
    # The raw DB-API executemany skips SQLAlchemy's per-row processing: about four times
    # faster than Core inserts here. Timestamps are pre-formatted as SQLAlchemy stores them.
    names = [column.name for column in table.columns]
    preparer = engine.dialect.identifier_preparer
    statement = (
        f"INSERT INTO {preparer.format_table(table)} "
        f"({', '.join(preparer.quote(name) for name in names)}) "
        f"VALUES ({', '.join('?' for _ in names)})"
    )
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        for chunk in _chunks(columns, names, chunk_rows):
            values = [
                _python_values(chunk[name], table.c[name], timestamp_suffix="") for name in names
            ]
            cursor.executemany(statement, zip(*values, strict=True))
            connection.commit()
            yield len(values[0])
        cursor.close()
    finally:
        connection.close()


def _insert_postgresql_copy(
    engine: Engine, table: sa.Table, columns: dict[str, np.ndarray], chunk_rows: int
) -> Iterator[int]:
    from psycopg import sql

    names = [column.name for column in table.columns]
    target = (
        sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)
    )
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        target, sql.SQL(", ").join(sql.Identifier(name) for name in names)
    )
    connection = engine.raw_connection()
    try:
        driver_connection = connection.driver_connection
        for chunk in _chunks(columns, names, chunk_rows):
            values = [
                _python_values(chunk[name], table.c[name], timestamp_suffix="+00") for name in names
            ]
            with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
                for row in zip(*values, strict=True):
                    copy.write_row(row)
            driver_connection.commit()
            yield len(values[0])
    finally:
        connection.close()


def _insert_core(
    engine: Engine, table: sa.Table, columns: dict[str, np.ndarray], chunk_rows: int
) -> Iterator[int]:
    names = [column.name for column in table.columns]
    for chunk in _chunks(columns, names, chunk_rows):
        values = [
            _python_values(chunk[name], table.c[name], timestamp_suffix=None) for name in names
        ]
        records = [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
        with engine.begin() as connection:
            connection.execute(table.insert(), records)
        yield len(records)


def _python_values(values: np.ndarray, column: sa.Column, timestamp_suffix: str | None) -> list:
    """Convert one column chunk to Python values for the driver, with None for NULL.

    Timestamps become text with ``timestamp_suffix`` appended, or UTC-aware datetimes
    when the suffix is None.
    """
    if values.dtype.kind == "M":
        if timestamp_suffix is not None:
            return _timestamp_text(values, timestamp_suffix)
        out = values.astype("datetime64[us]").astype(object)
        return [None if value is None else value.replace(tzinfo=dt.UTC) for value in out]
    if values.dtype.kind == "f" and isinstance(column.type, sa.Integer):
        present = ~np.isnan(values)
        out = np.full(len(values), None, dtype=object)
        out[present] = values[present].astype(np.int64).astype(object)
        return out.tolist()
    return values.tolist()


@functools.cache
def _time_of_day_text() -> np.ndarray:
    return np.array(
        [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.000000" for s in range(DAY_SECONDS)],
        dtype=object,
    )


def _timestamp_text(values: np.ndarray, suffix: str) -> list:
    """Format datetime64[s] as 'YYYY-MM-DD HH:MM:SS.ffffff' + suffix in UTC, None for NaT.

    Without a suffix this is SQLAlchemy's storage format for DateTime on SQLite. Dates
    and times of day are formatted once each and joined, which took 0.8 s where numpy's
    datetime_as_string took 6 s on 3 million rows.
    """
    missing = np.isnat(values)
    if missing.all():
        return [None] * len(values)
    seconds = values.astype(np.int64)
    seconds = np.where(missing, seconds[~missing][0], seconds)
    days = seconds // DAY_SECONDS
    first_day = int(days.min())
    calendar = np.arange(first_day, days.max() + 1).astype("datetime64[D]")
    day_text = np.array([f"{day} " for day in np.datetime_as_string(calendar)], dtype=object)
    text = day_text[days - first_day] + _time_of_day_text()[seconds % DAY_SECONDS]
    if suffix:
        text = text + suffix
    text[missing] = None
    return text.tolist()


def _summarise(
    company: dict[str, dict[str, np.ndarray]],
    url: str,
    seed: int,
    leads: int,
    months: int,
    end: dt.date,
    horizon_days: int,
) -> SimulationSummary:
    window = _Window.ending(end, months)
    row_counts = {name: len(next(iter(company[name].values()))) for name in TABLE_ORDER}
    won = company["opportunities"]["won"] == True  # noqa: E712 - object array of True, False, None
    truth = company["simulation_truth"]
    customer_rows = pd.Index(truth["lead_id"]).get_indexer(company["opportunities"]["lead_id"][won])
    customers = len(customer_rows)
    return SimulationSummary(
        url=redact_url(url),
        seed=seed,
        leads=leads,
        months=months,
        start=window.start,
        end=window.end,
        horizon_days=horizon_days,
        row_counts=row_counts,
        customers=customers,
        conversion_rate=customers / leads,
        mean_expected_ltv=float(truth["expected_ltv"][customer_rows].mean())
        if customers
        else float("nan"),
        revenue=float(company["invoices"]["amount"].sum()),
    )
