"""IBM Telco customer churn: a billing-only snapshot of 7,043 customers without dates.

The raw table is the CSV as text. The mapping builds each customer's monthly invoices
backwards from a reference date R using ``tenure``: the customer paid ``tenure`` months
up to R, at TotalCharges / tenure each. A customer who churned left in the last of those
months, and one who stayed has also been billed, at R, for the month after it, at the
current MonthlyCharges. A run as of the day after R therefore counts every churn and no
other. CRM sources are absent, so runs publish LTV labels only.
docs/datasets/telco.md describes the choices.
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

FOLDER = "ibm_telco_customer_churn"
CUSTOMERS_FILE = "Telco-Customer-Churn.csv"
RAW_CUSTOMERS = "telco_raw_customers"
CURRENCY = "USD"


@dataclass(frozen=True)
class TelcoAssumptions:
    """Reference date R (the end of the snapshot's last month, a first of the month) and
    the share of revenue spent serving a customer, for the gross margin."""

    reference_date: dt.date = dt.date(2024, 1, 1)
    cost_rate: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.reference_date, dt.date) or self.reference_date.day != 1:
            raise ValueError(
                f"reference_date must be the first day of a month. Got {self.reference_date!r}."
            )
        if not 0 <= self.cost_rate < 1:
            raise ValueError(f"cost_rate must be in [0, 1). Got {self.cost_rate!r}.")

    @property
    def as_of(self) -> dt.date:
        """As-of date whose run counts each churn: the day after the reference date."""
        return self.reference_date + dt.timedelta(days=1)


def read_raw_tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Read the churn CSV as text, so TotalCharges keeps its blank values."""
    return {RAW_CUSTOMERS: read_csv_as_text(locate_file(data_dir, FOLDER, CUSTOMERS_FILE))}


def billing_accounts_sql(dialect: SqlDialect, assumptions: TelcoAssumptions) -> str:
    """Return the billing_accounts SELECT: one account per customer, started tenure months ago."""
    reference = dialect.timestamp_literal(assumptions.reference_date)
    tenure = dialect.integer("raw.tenure")
    return dedent_sql(f"""
        SELECT
            raw."customerID" AS account_id,
            {dialect.add_months(reference, f"-{tenure}")} AS started_at,
            CASE WHEN TRIM(raw."Churn") = 'Yes' THEN {reference} END AS cancelled_at,
            TRIM(raw."Contract") AS plan,
            '{CURRENCY}' AS currency,
            TRIM(raw."InternetService") AS internet_service,
            TRIM(raw."PaymentMethod") AS payment_method
        FROM {RAW_CUSTOMERS} AS raw
    """)


def invoices_sql(dialect: SqlDialect, assumptions: TelcoAssumptions) -> str:
    """Return the invoices SELECT: months 1 to tenure before R, and month 0 for those who stay.

    Month ``n`` covers [R - n months, R - (n - 1) months) and is issued at its start.
    """
    reference = dialect.timestamp_literal(assumptions.reference_date)
    tenure = dialect.integer("raw.tenure")
    total_charges = dialect.number('raw."TotalCharges"')
    monthly_charges = dialect.number('raw."MonthlyCharges"')
    period_start = dialect.add_months(reference, "-month_offset.n")
    amount = (
        f"CASE WHEN month_offset.n = 0 THEN {monthly_charges} "
        f"ELSE {total_charges} / {tenure} END"
    )
    return dedent_sql(f"""
        WITH RECURSIVE month_offset(n) AS (
            SELECT 0
            UNION ALL
            SELECT n + 1 FROM month_offset
            WHERE n < (SELECT MAX({dialect.integer("tenure")}) FROM {RAW_CUSTOMERS})
        )
        SELECT
            raw."customerID" || '-' || {dialect.text("month_offset.n")} AS invoice_id,
            raw."customerID" AS account_id,
            {period_start} AS period_start,
            {dialect.add_months(reference, "1 - month_offset.n")} AS period_end,
            {period_start} AS issued_at,
            {amount} AS amount,
            {sql_number(assumptions.cost_rate)} * ({amount}) AS cost,
            '{CURRENCY}' AS currency,
            'charge' AS kind
        FROM {RAW_CUSTOMERS} AS raw
        JOIN month_offset ON month_offset.n <= {tenure}
        WHERE month_offset.n >= 1 OR TRIM(raw."Churn") = 'No'
    """)


def build_config(dialect: SqlDialect, assumptions: TelcoAssumptions) -> GeneratedConfig:
    """Return the fulcrum.toml that labels LTV from the Telco snapshot's rebuilt invoices."""
    a = assumptions
    header = (
        "Fulcrum settings for the IBM Telco customer churn snapshot, written by\n"
        "'fulcrum load telco'. The snapshot has no dates: the invoices in the SQL below are\n"
        f"rebuilt backwards from the reference date {a.reference_date} using tenure. Run the\n"
        f"flow as of {a.as_of}, the day after it, to see each churn.\n"
        "docs/datasets/telco.md explains it."
    )
    settings = [ConfigEntry("currencies", [CURRENCY], "The snapshot's charges are in US dollars.")]
    sections = {
        "ltv": [
            ConfigEntry(
                "churn_grace_days",
                0,
                "Monthly invoices follow each other without gaps, so any gap is a cancellation.",
            ),
            ConfigEntry(
                "segment_column",
                "plan",
                "plan contains the Contract, so churn rates are per contract type.",
            ),
        ]
    }
    sources = [
        SourceMapping("leads", None, "The snapshot has no CRM data."),
        SourceMapping("lead_events", None),
        SourceMapping("opportunities", None),
        SourceMapping(
            "billing_accounts",
            billing_accounts_sql(dialect, a),
            "One account per customer; InternetService and PaymentMethod are kept as\n"
            "extra columns that ltv.segment_column may name instead of plan.",
        ),
        SourceMapping(
            "invoices",
            invoices_sql(dialect, a),
            f"tenure monthly charges up to {a.reference_date} at TotalCharges / tenure, plus the\n"
            "month after it at MonthlyCharges for customers who stay. TotalCharges is blank\n"
            f"only for tenure 0, which has no past month. Cost = {a.cost_rate:g} x amount.",
        ),
    ]
    return GeneratedConfig("telco", header, settings, sections, sources)


def load_telco(data_dir: Path, url: str, assumptions: TelcoAssumptions | None = None) -> LoadResult:
    """Land the churn CSV as a raw table at ``url`` and return the mappings and counts."""
    assumptions = assumptions or TelcoAssumptions()
    return load_dataset(
        "telco",
        url,
        lambda: read_raw_tables(data_dir),
        lambda dialect: build_config(dialect, assumptions),
    )
