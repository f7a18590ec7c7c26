"""Queries that prepare billing history for labelling inside the warehouse.

They apply the rules of tasks/labels.py, which docs/ltv.md states, to the work that grows
with the number of invoice lines. That work is the cutoff, the dropping rules and their
counts, each account's revenue and cost before the cutoff, and the coverage spells of
charges. Labelling then reads a few rows per account instead of one per invoice line. Times
are seconds since the epoch in UTC, from fulcrum.sqltime, so the same statements run on
SQLite and PostgreSQL.

The queries join no two sets of rows on a key. PostgreSQL 15 underestimates the rows that
pass a filter on a ranking such as ``row_number() = 1``, and it then planned nested loops
over the joins that followed. Those took 12 s for 10,668 invoice lines in tables not yet
analysed. Window functions and aggregates over stacked rows do the same work by sorting.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from fulcrum.contract import INVOICE_KINDS
from fulcrum.sqltime import epoch_seconds

# The timestamp columns of each source, which must contain timestamps or ISO 8601 text.
TIMESTAMP_COLUMNS = {
    "invoices": ("period_start", "period_end", "issued_at"),
    "billing_accounts": ("started_at",),
}
_INVOICE_SECONDS = {"period_start": "start_s", "period_end": "end_s", "issued_at": "issued_s"}


@dataclass(frozen=True)
class BillingQueries:
    """The statements that read billing history as of one cutoff.

    ``history`` returns rows of four parts, which its column ``part`` names, and each part
    fills only its own columns, leaving the others NULL:

    - 'account': one row per account kept, with account_id, segment and currency.
    - 'money': one row per account with invoice lines kept, with account_id, revenue, cost.
    - 'spell': one row per coverage spell, with account_id, spell_start and spell_end in
      epoch seconds.
    - 'problems': one row with a column per key of tasks.labels.DATA_PROBLEMS that counts
      that data problem, and a column per key of ``unparsable``.

    ``unparsable`` maps the name of the count of values that are not timestamps in a
    column to (source, column, a query for up to three such values).
    """

    history: sa.CompoundSelect
    unparsable: dict[str, tuple[str, str, sa.Select]]


def build_billing_queries(
    billing_accounts: sa.FromClause,
    invoices: sa.FromClause,
    segment_column: str | None,
    cutoff_seconds: float,
) -> BillingQueries:
    """Build the billing history query for a cutoff given in epoch seconds.

    ``segment_column`` names the billing_accounts column of the segment, or is None to give
    every account a NULL segment.
    """
    cutoff = sa.bindparam("cutoff_s", cutoff_seconds, type_=sa.Float)
    invoice_lines = _select_invoice_lines(invoices)
    account_rows = _select_account_rows(billing_accounts, segment_column)

    visible_lines = _rank_visible_lines(invoice_lines, cutoff)
    first_lines = (
        sa.select(*[column for column in visible_lines.c if column.name != "issue_rank"])
        .where(visible_lines.c.issue_rank == 1)
        .cte("first_lines")
    )
    started_accounts = _rank_started_accounts(account_rows, cutoff)
    accounts = (
        sa.select(
            started_accounts.c.account_id,
            started_accounts.c.segment,
            started_accounts.c.currency,
        )
        .where(started_accounts.c.start_rank == 1)
        .cte("accounts")
    )

    placed_lines = _place_lines_in_accounts(first_lines, accounts)
    # A line with a NULL currency matches no account, as in the pandas path.
    lines = (
        sa.select(*[placed_lines.c[column.name] for column in first_lines.c])
        .where(
            placed_lines.c.account_known == 1,
            placed_lines.c.currency == placed_lines.c.account_currency,
        )
        .cte("lines")
    )
    spells = _merge_charge_spells(lines)

    # One statement returns all parts, so they see the same state of the sources, and the
    # database computes the steps that the labels and the counts share only once.
    history = _stack_parts(
        {
            "account": sa.select(
                accounts.c.account_id, accounts.c.segment, accounts.c.currency
            ),
            "money": _sum_money(lines, cutoff),
            "spell": sa.select(
                spells.c.account_id,
                spells.c.start_s.label("spell_start"),
                spells.c.end_s.label("spell_end"),
            ),
            "problems": _count_problems(
                invoice_lines, account_rows, visible_lines, started_accounts, placed_lines, cutoff
            ),
        }
    )
    unparsable = {
        f"{source}_{column_name}_not_timestamps": (
            source,
            column_name,
            _select_unparsable_examples(selectable, column_name),
        )
        for source, selectable in (("invoices", invoices), ("billing_accounts", billing_accounts))
        for column_name in TIMESTAMP_COLUMNS[source]
    }
    return BillingQueries(history=history, unparsable=unparsable)


def _stack_parts(parts: dict[str, sa.Select]) -> sa.CompoundSelect:
    """Stack the rows of each part under the union of their columns, with NULL for the
    columns that a part lacks and the part's name in the column ``part``."""
    subqueries = {name: select.subquery(f"{name}_part") for name, select in parts.items()}
    types = {}
    for subquery in subqueries.values():
        for column in subquery.c:
            if isinstance(types.get(column.name, sa.types.NULLTYPE), sa.types.NullType):
                types[column.name] = column.type

    return sa.union_all(
        *(
            sa.select(
                sa.literal(name).label("part"),
                *(
                    subquery.c[column]
                    if column in subquery.c
                    else _typed_null(types[column]).label(column)
                    for column in types
                ),
            )
            for name, subquery in subqueries.items()
        )
    )


def _typed_null(column_type: sa.types.TypeEngine) -> sa.ColumnElement:
    # PostgreSQL types a chain of UNIONs pair by pair, and two untyped NULLs become text,
    # so a NULL gets the type of its column where the type is known.
    if isinstance(column_type, sa.types.NullType):
        return sa.null()
    return sa.cast(sa.null(), column_type)


def _seconds(column: sa.ColumnElement) -> sa.ColumnElement:
    # PostgreSQL's EXTRACT returns numeric. Double precision makes the ratio of two
    # durations the same IEEE division that the pandas path does.
    return sa.cast(epoch_seconds(column), sa.Float)


def _count_where(condition: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.count(sa.case((condition, 1)))


def _not_timestamp(raw: sa.ColumnElement, seconds: sa.ColumnElement) -> sa.ColumnElement:
    return sa.and_(raw.is_not(None), seconds.is_(None))


def _select_invoice_lines(invoices: sa.FromClause) -> sa.CTE:
    """Select every invoice line with times in epoch seconds and amount and cost as numbers.

    The raw timestamp columns come along to find values that are not timestamps.

    NOTE: SQLite casts text that is not a number to 0.0, where PostgreSQL and the pandas
    path raise. The validation stage reports such amounts before labelling runs.
    """
    columns = invoices.c
    return sa.select(
        columns.invoice_id.label("invoice_id"),
        sa.cast(columns.account_id, sa.Text).label("account_id"),
        columns.currency.label("currency"),
        columns.kind.label("kind"),
        sa.cast(columns.amount, sa.Float).label("amount"),
        sa.cast(columns.cost, sa.Float).label("cost"),
        *(_seconds(columns[raw]).label(seconds) for raw, seconds in _INVOICE_SECONDS.items()),
        *(columns[raw] for raw in _INVOICE_SECONDS),
    ).cte("invoice_lines")


def _select_account_rows(
    billing_accounts: sa.FromClause, segment_column: str | None
) -> sa.CTE:
    """Select every billing account with its start in epoch seconds and its segment as text."""
    columns = billing_accounts.c
    if segment_column is None:
        segment = sa.null()
    else:
        segment = sa.cast(columns[segment_column], sa.Text)
    return sa.select(
        sa.cast(columns.account_id, sa.Text).label("account_id"),
        segment.label("segment"),
        columns.currency.label("currency"),
        _seconds(columns.started_at).label("started_s"),
        columns.started_at,
    ).cte("account_rows")


def _invoice_missing(lines: sa.CTE) -> sa.ColumnElement:
    names = ("invoice_id", "account_id", "start_s", "end_s", "issued_s", "amount", "cost")
    return sa.or_(*(lines.c[name].is_(None) for name in names))


def _account_missing(account_rows: sa.CTE) -> sa.ColumnElement:
    columns = account_rows.c
    return sa.or_(
        columns.account_id.is_(None), columns.started_s.is_(None), columns.currency.is_(None)
    )


def _rank_visible_lines(lines: sa.CTE, cutoff: sa.BindParameter) -> sa.CTE:
    """Keep the complete lines issued before the cutoff, ranked by issue time per invoice_id.

    NOTE: lines that share an invoice_id and an issue time tie, and the database keeps any
    one of them, where the pandas path keeps the first in row order. SQLite rounds times to
    milliseconds, so there lines issued less than a millisecond apart tie as well.
    """
    columns = lines.c
    issue_rank = sa.func.row_number().over(
        partition_by=columns.invoice_id, order_by=columns.issued_s
    )
    kept_columns = [column for column in columns if column.name not in _INVOICE_SECONDS]
    return (
        sa.select(*kept_columns, issue_rank.label("issue_rank"))
        .where(
            ~_invoice_missing(lines),
            columns.issued_s < cutoff,
            columns.end_s >= columns.start_s,
        )
        .cte("visible_lines")
    )


def _rank_started_accounts(account_rows: sa.CTE, cutoff: sa.BindParameter) -> sa.CTE:
    """Keep the complete accounts started before the cutoff, ranked by start per account_id."""
    columns = account_rows.c
    start_rank = sa.func.row_number().over(
        partition_by=columns.account_id, order_by=columns.started_s
    )
    kept_columns = [column for column in columns if column.name != "started_at"]
    return (
        sa.select(*kept_columns, start_rank.label("start_rank"))
        .where(~_account_missing(account_rows), columns.started_s < cutoff)
        .cte("started_accounts")
    )


def _place_lines_in_accounts(first_lines: sa.CTE, accounts: sa.CTE) -> sa.CTE:
    """Add account_known (1 when the line's account is kept, else 0) and account_currency.

    Accounts and lines are stacked and compared by window functions over account_id,
    which avoids a join.
    """
    line_columns = [column for column in first_lines.c if column.name != "account_id"]
    stacked = sa.union_all(
        sa.select(
            accounts.c.account_id,
            sa.literal(1).label("is_account"),
            accounts.c.currency.label("account_currency"),
            *(_typed_null(column.type).label(column.name) for column in line_columns),
        ),
        sa.select(first_lines.c.account_id, sa.literal(0), sa.null(), *line_columns),
    ).subquery("stacked")

    by_account = {"partition_by": stacked.c.account_id}
    placed = sa.select(
        *(stacked.c[column.name] for column in first_lines.c),
        stacked.c.is_account,
        sa.func.max(stacked.c.is_account).over(**by_account).label("account_known"),
        sa.func.max(stacked.c.account_currency).over(**by_account).label("account_currency"),
    ).subquery("placed")
    return (
        sa.select(*[column for column in placed.c if column.name != "is_account"])
        .where(placed.c.is_account == 0)
        .cte("placed_lines")
    )


def _revenue_share(periods: sa.CTE, cutoff: sa.BindParameter) -> sa.ColumnElement:
    """Return the share of each period's amount and cost that falls before the cutoff.

    A period counts (min(end, cutoff) - start) / (end - start), which is the sum of the
    month-by-month pieces that the pandas path adds up. An empty period belongs to one-off
    amounts, which count in full because they were issued before the cutoff.
    """
    start = periods.c.start_s
    end = periods.c.end_s
    served_until = sa.case((end < cutoff, end), else_=cutoff)
    return sa.case(
        (end == start, 1.0),
        (start < cutoff, (served_until - start) / (end - start)),
        else_=0.0,
    )


def _merge_charge_spells(lines: sa.CTE) -> sa.CTE:
    """Merge each account's charge periods into spells: account_id, start_s and end_s.

    This is gaps and islands: a charge opens a new spell when it starts after every
    earlier charge of the account has ended, so overlapping and back-to-back periods join.
    """
    columns = lines.c
    order = (columns.start_s, columns.end_s, columns.invoice_id)
    earlier_reach = sa.func.max(columns.end_s).over(
        partition_by=columns.account_id, order_by=order, rows=(None, -1)
    )
    opens_spell = sa.case(
        (sa.or_(earlier_reach.is_(None), columns.start_s > earlier_reach), 1), else_=0
    )
    charges = (
        sa.select(
            columns.account_id,
            columns.start_s,
            columns.end_s,
            columns.invoice_id,
            opens_spell.label("opens_spell"),
        )
        .where(columns.kind == "charge", columns.end_s > columns.start_s)
        .cte("charges")
    )

    spell_number = sa.func.sum(charges.c.opens_spell).over(
        partition_by=charges.c.account_id,
        order_by=(charges.c.start_s, charges.c.end_s, charges.c.invoice_id),
        rows=(None, 0),
    )
    numbered = sa.select(
        charges.c.account_id,
        charges.c.start_s,
        charges.c.end_s,
        spell_number.label("spell_number"),
    ).cte("numbered_charges")
    return (
        sa.select(
            numbered.c.account_id,
            sa.func.min(numbered.c.start_s).label("start_s"),
            sa.func.max(numbered.c.end_s).label("end_s"),
        )
        .group_by(numbered.c.account_id, numbered.c.spell_number)
        .cte("spells")
    )


def _sum_money(lines: sa.CTE, cutoff: sa.BindParameter) -> sa.Select:
    """Select each account's revenue and cost before the cutoff: account_id, revenue, cost.

    Lines are summed per service period first, so that a refund of a whole charge cancels
    it exactly. In another order, such an account's revenue came out a few 1e-15 from
    zero, where the pandas path, which sums each month first, gives exactly 0.
    """
    periods = (
        sa.select(
            lines.c.account_id,
            lines.c.start_s,
            lines.c.end_s,
            sa.func.sum(lines.c.amount).label("amount"),
            sa.func.sum(lines.c.cost).label("cost"),
        )
        .group_by(lines.c.account_id, lines.c.start_s, lines.c.end_s)
        .cte("period_totals")
    )
    share = _revenue_share(periods, cutoff)
    return sa.select(
        periods.c.account_id,
        sa.func.sum(periods.c.amount * share).label("revenue"),
        sa.func.sum(periods.c.cost * share).label("cost"),
    ).group_by(periods.c.account_id)


def _count_problems(
    invoice_lines: sa.CTE,
    account_rows: sa.CTE,
    visible_lines: sa.CTE,
    started_accounts: sa.CTE,
    placed_lines: sa.CTE,
    cutoff: sa.BindParameter,
) -> sa.Select:
    """Select one row with the count of each data problem and of the values that are not
    timestamps in each timestamp column."""
    # A line or account with no issue or start time cannot be placed before or after the
    # cutoff, so it is reported whatever that time would have been.
    issued = invoice_lines.c.issued_s
    line_missing = _invoice_missing(invoice_lines)
    line_counts = sa.select(
        _count_where(sa.and_(line_missing, sa.or_(issued.is_(None), issued < cutoff))).label(
            "invoice_missing_values"
        ),
        _count_where(
            sa.and_(
                ~line_missing,
                issued < cutoff,
                invoice_lines.c.end_s < invoice_lines.c.start_s,
            )
        ).label("invoice_inverted_period"),
        *(
            _count_where(_not_timestamp(invoice_lines.c[raw], invoice_lines.c[seconds])).label(
                f"invoices_{raw}_not_timestamps"
            )
            for raw, seconds in _INVOICE_SECONDS.items()
        ),
    ).subquery("line_counts")

    duplicate_counts = sa.select(
        _count_where(visible_lines.c.issue_rank > 1).label("invoice_duplicate_id"),
    ).subquery("duplicate_counts")

    kind = placed_lines.c.kind
    amount = placed_lines.c.amount
    known = placed_lines.c.account_known == 1
    placed_counts = sa.select(
        _count_where(sa.or_(kind.is_(None), kind.not_in(INVOICE_KINDS))).label(
            "invoice_unknown_kind"
        ),
        _count_where(sa.and_(kind.in_(("refund", "credit")), amount > 0)).label(
            "invoice_positive_refund"
        ),
        _count_where(sa.and_(kind == "charge", amount < 0)).label("invoice_negative_charge"),
        _count_where(~known).label("invoice_unknown_account"),
        _count_where(
            sa.and_(
                known,
                sa.or_(
                    placed_lines.c.currency.is_(None),
                    placed_lines.c.currency != placed_lines.c.account_currency,
                ),
            )
        ).label("invoice_currency_mismatch"),
    ).subquery("placed_counts")

    started = account_rows.c.started_s
    account_counts = sa.select(
        _count_where(
            sa.and_(
                _account_missing(account_rows), sa.or_(started.is_(None), started < cutoff)
            )
        ).label("account_missing_values"),
        _count_where(_not_timestamp(account_rows.c.started_at, started)).label(
            "billing_accounts_started_at_not_timestamps"
        ),
    ).subquery("account_counts")
    account_duplicate_counts = sa.select(
        _count_where(started_accounts.c.start_rank > 1).label("account_duplicate_id"),
    ).subquery("account_duplicate_counts")

    parts = [line_counts, duplicate_counts, placed_counts, account_counts, account_duplicate_counts]
    # Each part is a single row, so joining them on TRUE gives one row of all the counts.
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.join(part, sa.true())
    return sa.select(*[column for part in parts for column in part.c]).select_from(joined)


def _select_unparsable_examples(selectable: sa.FromClause, column_name: str) -> sa.Select:
    column = selectable.c[column_name]
    return (
        sa.select(column)
        .where(_not_timestamp(column, epoch_seconds(column)))
        .distinct()
        .limit(3)
    )
