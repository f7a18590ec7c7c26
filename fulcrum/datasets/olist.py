"""Olist: the marketing funnel (MQLs and closed deals) and the marketplace's order items.

The five sources are SQL over three raw tables:

- leads: one per MQL, with only what exists before a deal: first contact date, landing
  page and origin;
- opportunities: one per closed deal, won at ``won_date``, account = the seller;
- billing_accounts: one per won seller, started at ``won_date``;
- invoices: Olist's commission on each order of a won seller, one charge per order and
  seller, whose service period is the 30 days after the sale;
- lead_events: absent, because the funnel has no activity data.

The assumptions (commission, cost, churn, end of the sales data) are `OlistAssumptions`;
docs/datasets/olist.md explains each one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fulcrum.datasets.common import (
    ConfigEntry,
    GeneratedConfig,
    LoadResult,
    SourceMapping,
    SqlDialect,
    dedent_sql,
    load_dataset,
    locate_file,
    read_csv_as_text,
    sql_number,
)

FUNNEL_FOLDER = "olist_marketing_funnel"
ECOMMERCE_FOLDER = "olist_ecommerce_parquet"
MQL_FILE = "olist_marketing_qualified_leads_dataset.csv"
CLOSED_DEALS_FILE = "olist_closed_deals_dataset.csv"
ORDER_ITEMS_FILE = "order_items.parquet"

RAW_MQL = "olist_raw_mql"
RAW_CLOSED_DEALS = "olist_raw_closed_deals"
RAW_ORDER_ITEMS = "olist_raw_order_items"

# Every sale keeps a seller covered for this many days, so "N months without sales" is a
# gap in coverage of 30 x (N - 1) days after the last covered day.
SALE_COVERAGE_DAYS = 30
CURRENCY = "BRL"


@dataclass(frozen=True)
class OlistAssumptions:
    """Assumptions the Olist files leave open, baked into the SQL mappings.

    ``commission_rate``: Olist's revenue as a share of item price. ``cost_rate``: the share
    of that revenue spent serving the seller. ``churn_months``: months without a sale
    after which a seller counts as churned. ``sales_end``: first day not covered by the
    order items export; later items are not billed. ``freshness_days``: how old the newest
    lead may be before a run stops.
    """

    commission_rate: float = 0.10
    cost_rate: float = 0.30
    churn_months: int = 2
    sales_end: dt.date = dt.date(2018, 9, 1)
    freshness_days: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.commission_rate <= 1:
            raise ValueError(
                f"commission_rate must be in (0, 1]. Got {self.commission_rate!r}."
            )
        if not 0 <= self.cost_rate < 1:
            raise ValueError(f"cost_rate must be in [0, 1). Got {self.cost_rate!r}.")
        if not _is_int_between(self.churn_months, 1, 24):
            raise ValueError(
                f"churn_months must be an integer from 1 to 24. Got {self.churn_months!r}."
            )
        if not isinstance(self.sales_end, dt.date):
            raise ValueError(f"sales_end must be a date. Got {self.sales_end!r}.")
        if not _is_int_between(self.freshness_days, 0, 3650):
            raise ValueError(
                f"freshness_days must be an integer from 0 to 3650. Got {self.freshness_days!r}."
            )

    @property
    def churn_grace_days(self) -> int:
        """Gap in coverage, in days, that the labels stage may see without counting a churn."""
        return SALE_COVERAGE_DAYS * (self.churn_months - 1)

    @property
    def churn_after_days(self) -> int:
        """Days without a sale after which a seller counts as churned."""
        return SALE_COVERAGE_DAYS * self.churn_months

    @property
    def all_sellers_churned_from(self) -> dt.date:
        """First as-of date at which every seller with a sale counts as churned.

        Runs after ``sales_end`` see the end of the export as sellers falling silent, and
        from this date on the silence of every seller is long enough to be a churn.
        """
        return self.sales_end + dt.timedelta(days=self.churn_after_days)


def _is_int_between(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def read_raw_tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Read the two funnel CSV files as text and the order items Parquet file as typed."""
    return {
        RAW_MQL: read_csv_as_text(locate_file(data_dir, FUNNEL_FOLDER, MQL_FILE)),
        RAW_CLOSED_DEALS: read_csv_as_text(locate_file(data_dir, FUNNEL_FOLDER, CLOSED_DEALS_FILE)),
        RAW_ORDER_ITEMS: pd.read_parquet(locate_file(data_dir, ECOMMERCE_FOLDER, ORDER_ITEMS_FILE)),
    }


def leads_sql(dialect: SqlDialect) -> str:
    """Return the leads SELECT: one row per MQL, without the deal attributes of won leads."""
    return dedent_sql(f"""
        SELECT
            mql.mql_id AS lead_id,
            {dialect.timestamp("mql.first_contact_date")} AS created_at,
            NULLIF(TRIM(mql.origin), '') AS channel,
            CAST(NULL AS VARCHAR(255)) AS industry,
            CAST(NULL AS INTEGER) AS employees,
            CAST(NULL AS VARCHAR(255)) AS region,
            CAST(NULL AS VARCHAR(255)) AS seniority,
            {dialect.null_timestamp()} AS disqualified_at,
            NULLIF(TRIM(mql.landing_page_id), '') AS landing_page_id
        FROM {RAW_MQL} AS mql
    """)


def opportunities_sql(dialect: SqlDialect) -> str:
    """Return the opportunities SELECT: one won deal per closed deal, opened at first contact."""
    won_at = dialect.timestamp("deal.won_date")
    contact_at = dialect.timestamp("mql.first_contact_date")
    return dedent_sql(f"""
        SELECT
            deal.mql_id AS opportunity_id,
            deal.mql_id AS lead_id,
            NULLIF(TRIM(deal.seller_id), '') AS account_id,
            CASE
                WHEN mql.first_contact_date IS NULL OR {won_at} < {contact_at} THEN {won_at}
                ELSE {contact_at}
            END AS created_at,
            {won_at} AS closed_at,
            TRUE AS won
        FROM {RAW_CLOSED_DEALS} AS deal
        LEFT JOIN {RAW_MQL} AS mql ON mql.mql_id = deal.mql_id
    """)


def _billed_items_condition(dialect: SqlDialect, assumptions: OlistAssumptions) -> str:
    return (
        f"{dialect.timestamp('item.shipping_limit_date')} < "
        f"{dialect.timestamp_literal(assumptions.sales_end)}"
    )


def billing_accounts_sql(dialect: SqlDialect, assumptions: OlistAssumptions) -> str:
    """Return the billing_accounts SELECT: one account per won seller, started when won."""
    last_sale = dialect.timestamp("sales.last_sale_at")
    coverage_end = dialect.add_days(last_sale, SALE_COVERAGE_DAYS)
    churn_known_at = dialect.add_days(last_sale, assumptions.churn_after_days)
    sales_end = dialect.timestamp_literal(assumptions.sales_end)
    return dedent_sql(f"""
        SELECT
            deal.seller_id AS account_id,
            {dialect.timestamp("deal.won_date")} AS started_at,
            CASE
                WHEN sales.last_sale_at IS NOT NULL AND {churn_known_at} <= {sales_end}
                THEN {coverage_end}
            END AS cancelled_at,
            NULLIF(TRIM(deal.business_segment), '') AS plan,
            '{CURRENCY}' AS currency,
            NULLIF(TRIM(deal.lead_type), '') AS lead_type,
            NULLIF(TRIM(deal.business_type), '') AS business_type
        FROM {RAW_CLOSED_DEALS} AS deal
        LEFT JOIN (
            SELECT
                item.seller_id,
                MAX({dialect.timestamp("item.shipping_limit_date")}) AS last_sale_at
            FROM {RAW_ORDER_ITEMS} AS item
            WHERE {_billed_items_condition(dialect, assumptions)}
            GROUP BY item.seller_id
        ) AS sales ON sales.seller_id = deal.seller_id
    """)


def invoices_sql(dialect: SqlDialect, assumptions: OlistAssumptions) -> str:
    """Return the invoices SELECT: one 30-day commission charge per order and won seller."""
    sold_at = f"MIN({dialect.timestamp('item.shipping_limit_date')})"
    commission = sql_number(assumptions.commission_rate)
    cost_rate = sql_number(assumptions.cost_rate)
    return dedent_sql(f"""
        SELECT
            item.order_id || '-' || item.seller_id AS invoice_id,
            item.seller_id AS account_id,
            {sold_at} AS period_start,
            {dialect.add_days(sold_at, SALE_COVERAGE_DAYS)} AS period_end,
            {sold_at} AS issued_at,
            {commission} * SUM(item.price) AS amount,
            {cost_rate} * {commission} * SUM(item.price) AS cost,
            '{CURRENCY}' AS currency,
            'charge' AS kind
        FROM {RAW_ORDER_ITEMS} AS item
        WHERE item.seller_id IN (SELECT deal.seller_id FROM {RAW_CLOSED_DEALS} AS deal)
          AND {_billed_items_condition(dialect, assumptions)}
        GROUP BY item.order_id, item.seller_id
    """)


def build_config(dialect: SqlDialect, assumptions: OlistAssumptions) -> GeneratedConfig:
    """Return the fulcrum.toml that reads the Olist raw tables with these assumptions."""
    a = assumptions
    header = (
        "Fulcrum settings for the Olist marketing funnel and order items, written by\n"
        "'fulcrum load olist'. Every assumption below is baked into the SQL mappings.\n"
        "To change one, load again with other --commission-rate, --cost-rate,\n"
        "--churn-months or --sales-end values. docs/datasets/olist.md explains each one.\n"
        f"Runs after {a.sales_end} see the end of the sales export as sellers falling silent,\n"
        f"and from {a.all_sellers_churned_from} on every seller with a sale counts as churned."
    )
    settings = [
        ConfigEntry(
            "freshness_days",
            a.freshness_days,
            "The MQL export ends on 2018-05-31. With the default of 7 days every run after\n"
            "2018-06-07 stops at the freshness check, so a backfill to 2018-09-01 needs about\n"
            "100. Use the default on a live CRM.",
        ),
        ConfigEntry("currencies", [CURRENCY], "Olist bills in Brazilian reals."),
        ConfigEntry("experiment_name", "olist", "Keep these models apart from other datasets'."),
        ConfigEntry("conversion_model_name", "olist-conversion"),
        ConfigEntry("value_model_name", "olist-value"),
    ]
    sections = {
        "ltv": [
            ConfigEntry(
                "churn_grace_days",
                a.churn_grace_days,
                f"A seller counts as churned after {a.churn_months} month(s) without a sale.\n"
                f"Every sale covers {SALE_COVERAGE_DAYS} days, and a gap of more than this many\n"
                f"days after that is a churn ({a.churn_after_days} days without a sale in all).",
            ),
            ConfigEntry(
                "segment_column",
                "plan",
                "plan contains the seller's business_segment from the closed deal.",
            ),
        ]
    }
    sources = [
        SourceMapping(
            "leads",
            leads_sql(dialect),
            "One lead per MQL: first contact date, origin (blank -> NULL, 'unknown' kept as a\n"
            "category) and landing page. Deal attributes are not lead features.",
        ),
        SourceMapping("lead_events", None, "The Olist funnel has no activity data."),
        SourceMapping(
            "opportunities",
            opportunities_sql(dialect),
            "One won opportunity per closed deal. The one deal won before its first contact\n"
            "is opened at its won date.",
        ),
        SourceMapping(
            "billing_accounts",
            billing_accounts_sql(dialect, a),
            f"One account per won seller. cancelled_at is the end of the last sale's\n"
            f"coverage when the export shows {a.churn_after_days} days without a sale before\n"
            f"{a.sales_end}. It is known only {a.churn_after_days - SALE_COVERAGE_DAYS} days "
            "after the date itself,\nand the labels stage does not read it.",
        ),
        SourceMapping(
            "invoices",
            invoices_sql(dialect, a),
            f"Olist's commission of {a.commission_rate:g} x price per order and won seller,\n"
            "issued at the shipping limit date (the order date is not in the export) and\n"
            f"covering the {SALE_COVERAGE_DAYS} days after it. Cost = {a.cost_rate:g} x "
            f"commission.\nItems on or after {a.sales_end} are not billed.",
        ),
    ]
    return GeneratedConfig("olist", header, settings, sections, sources)


def load_olist(data_dir: Path, url: str, assumptions: OlistAssumptions | None = None) -> LoadResult:
    """Land the Olist files as raw tables at ``url`` and return the mappings and counts."""
    assumptions = assumptions or OlistAssumptions()
    return load_dataset(
        "olist",
        url,
        lambda: read_raw_tables(data_dir),
        lambda dialect: build_config(dialect, assumptions),
    )
