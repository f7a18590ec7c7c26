"""The warehouse data contract: the columns Fulcrum reads and the tables it writes.

All timestamps are stored in UTC. A naive timestamp read from the warehouse is taken
to be UTC. Money columns are in the row's own ``currency``; refunds and credits are
negative amounts. docs/data-contract.md states the same rules for people.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)


@dataclass(frozen=True)
class SourceColumn:
    """One column a source must provide."""

    name: str
    kind: str  # "string", "timestamp", "integer", "float", "boolean"
    nullable: bool
    description: str


@dataclass(frozen=True)
class SourceContract:
    """The columns one source must provide, and which of them form the key."""

    name: str
    columns: tuple[SourceColumn, ...]
    key: tuple[str, ...]
    created_column: str
    extra_columns_allowed: bool = False

    @property
    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    @property
    def required_columns(self) -> list[str]:
        return [column.name for column in self.columns if not column.nullable]

    @property
    def timestamp_columns(self) -> list[str]:
        return [column.name for column in self.columns if column.kind == "timestamp"]


def _col(name: str, kind: str, nullable: bool, description: str) -> SourceColumn:
    return SourceColumn(name, kind, nullable, description)


LEADS = SourceContract(
    name="leads",
    columns=(
        _col("lead_id", "string", False, "Unique lead identifier"),
        _col("created_at", "timestamp", False, "When the lead entered the CRM (UTC)"),
        _col("channel", "string", True, "Acquisition channel, for example organic or referral"),
        _col("industry", "string", True, "Industry of the lead's company"),
        _col("employees", "integer", True, "Head count of the lead's company"),
        _col("region", "string", True, "Sales region"),
        _col("seniority", "string", True, "Job seniority of the contact"),
        _col("disqualified_at", "timestamp", True, "When sales disqualified the lead (UTC)"),
    ),
    key=("lead_id",),
    created_column="created_at",
    extra_columns_allowed=True,
)

LEAD_EVENTS = SourceContract(
    name="lead_events",
    columns=(
        _col("lead_id", "string", False, "Lead the activity belongs to"),
        _col("event_type", "string", False, "Activity type, for example pricing_page_view"),
        _col("occurred_at", "timestamp", False, "When the activity happened (UTC)"),
    ),
    key=(),
    created_column="occurred_at",
)

OPPORTUNITIES = SourceContract(
    name="opportunities",
    columns=(
        _col("opportunity_id", "string", False, "Unique opportunity identifier"),
        _col("lead_id", "string", False, "Lead the opportunity came from"),
        _col("account_id", "string", True, "Billing account created when the deal was won"),
        _col("created_at", "timestamp", False, "When the opportunity was opened (UTC)"),
        _col("closed_at", "timestamp", True, "When it was won or lost; NULL while open"),
        _col("won", "boolean", True, "True when won, False when lost, NULL while open"),
    ),
    key=("opportunity_id",),
    created_column="created_at",
)

BILLING_ACCOUNTS = SourceContract(
    name="billing_accounts",
    columns=(
        _col("account_id", "string", False, "Unique billing account identifier"),
        _col("started_at", "timestamp", False, "Start of the first subscription (UTC)"),
        _col("cancelled_at", "timestamp", True, "End of the last subscription; NULL if active"),
        _col("plan", "string", True, "Plan or segment name"),
        _col("currency", "string", False, "ISO 4217 billing currency"),
    ),
    key=("account_id",),
    created_column="started_at",
    extra_columns_allowed=True,
)

INVOICES = SourceContract(
    name="invoices",
    columns=(
        _col("invoice_id", "string", False, "Unique invoice line identifier"),
        _col("account_id", "string", False, "Billing account invoiced"),
        _col("period_start", "timestamp", False, "Start of the service period, inclusive (UTC)"),
        _col("period_end", "timestamp", False, "End of the service period, exclusive (UTC)"),
        _col("issued_at", "timestamp", False, "When the invoice was issued (UTC)"),
        _col("amount", "float", False, "Net amount after discounts; negative for refunds and credits"),
        _col("cost", "float", False, "Cost to serve the period, for gross margin; 0 for refunds"),
        _col("currency", "string", False, "ISO 4217 currency of amount and cost"),
        _col("kind", "string", False, "charge, refund or credit"),
    ),
    key=("invoice_id",),
    created_column="issued_at",
)

SOURCES: dict[str, SourceContract] = {
    contract.name: contract
    for contract in (LEADS, LEAD_EVENTS, OPPORTUNITIES, BILLING_ACCOUNTS, INVOICES)
}

INVOICE_KINDS = ("charge", "refund", "credit")

# Identifiers and labels are Text, not VARCHAR(n): a CRM id or a category may be longer than
# any fixed limit, and PostgreSQL rejects a value longer than VARCHAR's length.
_SQL_TYPES = {
    "string": Text,
    "timestamp": lambda: DateTime(timezone=True),
    "integer": Integer,
    "float": Float,
    "boolean": Boolean,
}


def define_source_tables(metadata: MetaData, schema: str | None = None) -> dict[str, Table]:
    """Add the five source tables, with the contract's own names, to ``metadata``.

    The pipeline does not need these tables to exist: a mapping can point each source
    anywhere. The simulator and the tests write to them.
    """
    tables = {}
    for contract in SOURCES.values():
        columns = [
            Column(
                column.name,
                _SQL_TYPES[column.kind](),
                nullable=column.nullable,
                primary_key=column.name in contract.key,
            )
            for column in contract.columns
        ]
        if contract.name == "leads":
            columns.append(Column("country", String(64), nullable=True))
        if contract.name == "billing_accounts":
            columns.append(Column("seats", Integer, nullable=True))
            columns.append(Column("billing_period", String(16), nullable=True))
        tables[contract.name] = Table(contract.name, metadata, *columns, schema=schema)
    return tables


def current_process_identity() -> str:
    """Return ``host:pid:start`` for this process, the value of ``score_runs.process``.

    ``start`` is the process start time in clock ticks since boot, read from /proc on Linux
    and empty elsewhere. It distinguishes a process from a later one that reuses its pid.
    """
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start_ticks(pid) or ''}"


def process_start_ticks(pid: int) -> str | None:
    """Return the start time of process ``pid`` in clock ticks since boot, or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so fields are counted after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


# The partition key of the per-date output tables on PostgreSQL, in pg_get_partkeydef's form.
PARTITION_BY_AS_OF = "LIST (as_of)"


def define_output_tables(metadata: MetaData, schema: str | None = None) -> dict[str, Table]:
    """Add the four tables Fulcrum writes to ``metadata``.

    On PostgreSQL the three tables with one set of rows per ``as_of`` are partitioned by
    ``LIST (as_of)``, so that publishing can swap in one date's rows as a whole partition.
    Other databases ignore the ``postgresql_partition_by`` option.
    """
    lead_scores = Table(
        "lead_scores",
        metadata,
        Column("as_of", Date, primary_key=True),
        Column("lead_id", Text, primary_key=True),
        Column("p_convert", Float, nullable=False),
        Column("predicted_ltv", Float, nullable=True),
        Column("expected_value", Float, nullable=True),
        Column("overlay_weight", Float, nullable=False),
        Column("overlay_score", Float, nullable=False),
        Column("rank_volume", Integer, nullable=False),
        Column("rank_value", Integer, nullable=True),
        Column("rank_expected_value", Integer, nullable=True),
        Column("rank_overlay", Integer, nullable=False),
        Column("route", String(16), nullable=False),
        Column("conversion_model_version", String(64), nullable=False),
        Column("value_model_version", String(64), nullable=True),
        Column("run_id", String(64), nullable=False),
        schema=schema,
        postgresql_partition_by=PARTITION_BY_AS_OF,
    )
    account_ltv = Table(
        "account_ltv",
        metadata,
        Column("as_of", Date, primary_key=True),
        Column("account_id", Text, primary_key=True),
        Column("segment", Text, nullable=True),
        Column("currency", String(3), nullable=False),
        Column("months_billed", Float, nullable=False),
        Column("revenue", Float, nullable=False),
        Column("cost", Float, nullable=False),
        Column("arpu", Float, nullable=True),
        Column("gross_margin", Float, nullable=True),
        Column("churn_rate", Float, nullable=True),
        Column("expected_lifetime_months", Float, nullable=True),
        Column("ltv", Float, nullable=True),
        Column("is_active", Boolean, nullable=False),
        Column("run_id", String(64), nullable=False),
        schema=schema,
        postgresql_partition_by=PARTITION_BY_AS_OF,
    )
    score_runs = Table(
        "score_runs",
        metadata,
        Column("run_id", String(64), primary_key=True),
        Column("flow_run_id", String(64), nullable=True),
        Column("flow_name", String(64), nullable=False),
        Column("as_of", Date, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True), nullable=True),
        Column("status", String(16), nullable=False),
        Column("failed_stage", String(32), nullable=True),
        Column("message", Text, nullable=True),
        Column("leads_scored", Integer, nullable=True),
        Column("accounts_labelled", Integer, nullable=True),
        Column("conversion_model_version", String(64), nullable=True),
        Column("value_model_version", String(64), nullable=True),
        Column("validation_summary", Text, nullable=True),
        Column("metrics", Text, nullable=True),
        # Filled in on insert, so that a later run can tell a row whose process has ended
        # from the row of a run that is still going.
        Column("process", Text, nullable=True, default=current_process_identity),
        schema=schema,
    )
    frontier = Table(
        "volume_value_frontier",
        metadata,
        Column("as_of", Date, primary_key=True),
        Column("overlay_weight", Float, primary_key=True),
        Column("capacity", Integer, nullable=False),
        Column("expected_conversions", Float, nullable=False),
        Column("expected_value", Float, nullable=True),
        Column("run_id", String(64), nullable=False),
        schema=schema,
        postgresql_partition_by=PARTITION_BY_AS_OF,
    )
    return {
        "lead_scores": lead_scores,
        "account_ltv": account_ltv,
        "score_runs": score_runs,
        "volume_value_frontier": frontier,
    }


def define_truth_table(metadata: MetaData, schema: str | None = None) -> Table:
    """Define the simulator's ground-truth table, one row per lead. The pipeline never reads it."""
    return Table(
        "simulation_truth",
        metadata,
        Column("lead_id", Text, primary_key=True),
        Column("p_convert_ever", Float, nullable=False),
        Column("conversion_delay_days_mean", Float, nullable=False),
        Column("p_convert_horizon", Float, nullable=False),
        Column("expected_ltv", Float, nullable=False),
        Column("horizon_days", Integer, nullable=False),
        schema=schema,
    )
