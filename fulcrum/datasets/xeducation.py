"""X Education: a conversion-only CRM export of 9,240 leads without any timestamp.

The raw table is ``Leads.csv`` as text. The mapping gives every lead a synthetic but
reproducible timeline: ``created_at`` spreads the leads over ``span_days`` from
``start`` in ``Lead Number`` order, and each lead is decided ``decision_days`` later,
won when ``Converted`` is 1 and disqualified otherwise. Columns that the sales team
fills in after contact are never mapped, because they reveal the outcome. Billing is
absent, so runs publish conversion scores without a value. docs/datasets/xeducation.md
describes the choices.
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
)

FOLDER = "x_education_leads"
LEADS_FILE = "Leads.csv"
RAW_LEADS = "xeducation_raw_leads"

# Form fields the lead filled in and its website behaviour: (raw column, name, kind).
# "category" is trimmed and lower-cased, with blank and the form placeholder 'Select' as
# NULL. "flag" maps Yes/No to 1/0. "number" casts text to a float, with blank as NULL.
FEATURE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Lead Origin", "lead_origin", "category"),
    ("Lead Source", "channel", "category"),
    ("Do Not Email", "do_not_email", "flag"),
    ("Do Not Call", "do_not_call", "flag"),
    ("TotalVisits", "total_visits", "number"),
    ("Total Time Spent on Website", "total_time_on_website", "number"),
    ("Page Views Per Visit", "page_views_per_visit", "number"),
    ("Country", "region", "category"),
    ("City", "city", "category"),
    ("Specialization", "industry", "category"),
    ("What is your current occupation", "occupation", "category"),
    ("How did you hear about X Education", "heard_from", "category"),
    ("What matters most to you in choosing a course", "what_matters_most", "category"),
    ("Search", "saw_search_ad", "flag"),
    ("Magazine", "saw_magazine_ad", "flag"),
    ("Newspaper Article", "saw_newspaper_article", "flag"),
    ("X Education Forums", "saw_forum_post", "flag"),
    ("Newspaper", "saw_newspaper_ad", "flag"),
    ("Digital Advertisement", "saw_digital_ad", "flag"),
    ("Through Recommendations", "came_through_recommendation", "flag"),
    ("Receive More Updates About Our Courses", "wants_course_updates", "flag"),
    ("Update me on Supply Chain Content", "wants_supply_chain_updates", "flag"),
    ("Get updates on DM Content", "wants_dm_updates", "flag"),
    ("A free copy of Mastering The Interview", "wants_free_book", "flag"),
)

# Columns that are not lead features, with the reason. Each is filled in or changed after
# the lead is contacted, so it carries the outcome the model is asked to predict.
EXCLUDED_COLUMNS: dict[str, str] = {
    "Converted": "the label itself",
    "Tags": "the lead's current status, set by the sales team (for example 'Closed by Horizzon')",
    "Lead Quality": "the assigned employee's judgement after contact",
    "Lead Profile": "a level assigned to the lead by staff",
    "Asymmetrique Activity Index": "an index assigned from activity, also after contact",
    "Asymmetrique Profile Index": "an index assigned by staff from the profile",
    "Asymmetrique Activity Score": "the score behind the activity index",
    "Asymmetrique Profile Score": "the score behind the profile index",
    "Last Activity": "the last activity as of the export, after the outcome",
    "Last Notable Activity": "the last notable activity as of the export, after the outcome",
    "I agree to pay the amount through cheque": "a payment choice, made when enrolling",
}

CATEGORY_PLACEHOLDER = "select"


@dataclass(frozen=True)
class XEducationTimeline:
    """The synthetic timeline: leads arrive over ``span_days`` from ``start`` and are
    decided ``decision_days`` after they arrive."""

    start: dt.date = dt.date(2020, 1, 1)
    span_days: int = 365
    decision_days: int = 30

    def __post_init__(self) -> None:
        if not isinstance(self.start, dt.date):
            raise ValueError(f"start must be a date. Got {self.start!r}.")
        for name in ("span_days", "decision_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Got {value!r}.")

    @property
    def end(self) -> dt.date:
        """First day after the last lead arrives. A run as of it scores the undecided leads."""
        return self.start + dt.timedelta(days=self.span_days)


def read_raw_tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Read Leads.csv as text, without the empty column its trailing commas create."""
    return {RAW_LEADS: read_csv_as_text(locate_file(data_dir, FOLDER, LEADS_FILE))}


def feature_expression(dialect: SqlDialect, raw_column: str, kind: str) -> str:
    """Return the SQL that turns one raw text column into a lead feature."""
    column = f'raw."{raw_column}"'
    if kind == "category":
        cleaned = f"LOWER(TRIM({column}))"
        return f"CASE WHEN {cleaned} IN ('', '{CATEGORY_PLACEHOLDER}') THEN NULL ELSE {cleaned} END"
    if kind == "flag":
        return f"CASE TRIM({column}) WHEN 'Yes' THEN 1 WHEN 'No' THEN 0 END"
    if kind == "number":
        return dialect.number(column)
    raise ValueError(f"kind must be one of 'category', 'flag', 'number'. Got {kind!r}.")


def created_at_expression(dialect: SqlDialect, timeline: XEducationTimeline) -> str:
    """Spread leads linearly in Lead Number over the span, to the second."""
    number = dialect.integer('raw."Lead Number"')
    seconds = (
        f"({number} - numbering.first_number) * {timeline.span_days * 86_400 - 1} "
        f"/ (CASE WHEN numbering.last_number > numbering.first_number "
        f"THEN numbering.last_number - numbering.first_number ELSE 1 END)"
    )
    return dialect.add_seconds(dialect.timestamp_literal(timeline.start), seconds)


def _numbering_join(dialect: SqlDialect) -> str:
    number = dialect.integer('"Lead Number"')
    return (
        f"CROSS JOIN (SELECT MIN({number}) AS first_number, MAX({number}) AS last_number "
        f"FROM {RAW_LEADS}) AS numbering"
    )


def leads_sql(dialect: SqlDialect, timeline: XEducationTimeline) -> str:
    """Return the leads SELECT: one row per lead, disqualified when decided unless converted."""
    created_at = created_at_expression(dialect, timeline)
    features = ",\n".join(
        f"    {feature_expression(dialect, raw, kind)} AS {name}"
        for raw, name, kind in FEATURE_COLUMNS
    )
    decided_at = dialect.add_days(created_at, timeline.decision_days)
    body = dedent_sql(f"""
        SELECT
            raw."Prospect ID" AS lead_id,
            {created_at} AS created_at,
            CAST(NULL AS INTEGER) AS employees,
            CAST(NULL AS VARCHAR(255)) AS seniority,
            CASE
                WHEN TRIM(raw."Converted") = '1' THEN {dialect.null_timestamp()}
                ELSE {decided_at}
            END AS disqualified_at,
        """)
    tail = dedent_sql(f"""
        FROM {RAW_LEADS} AS raw
        {_numbering_join(dialect)}
    """)
    return f"{body}\n{features}\n{tail}"


def opportunities_sql(dialect: SqlDialect, timeline: XEducationTimeline) -> str:
    """Return the opportunities SELECT: one won deal per converted lead, closed when decided."""
    created_at = created_at_expression(dialect, timeline)
    return dedent_sql(f"""
        SELECT
            raw."Prospect ID" AS opportunity_id,
            raw."Prospect ID" AS lead_id,
            CAST(NULL AS VARCHAR(255)) AS account_id,
            {created_at} AS created_at,
            {dialect.add_days(created_at, timeline.decision_days)} AS closed_at,
            TRUE AS won
        FROM {RAW_LEADS} AS raw
        {_numbering_join(dialect)}
        WHERE TRIM(raw."Converted") = '1'
    """)


def build_config(dialect: SqlDialect, timeline: XEducationTimeline) -> GeneratedConfig:
    """Return the fulcrum.toml that reads the X Education raw table on the synthetic timeline."""
    header = (
        "Fulcrum settings for the X Education leads export, written by\n"
        "'fulcrum load xeducation'. The export has no timestamps: the timeline in the SQL\n"
        f"below is SYNTHETIC. Leads arrive from {timeline.start} over {timeline.span_days} days\n"
        f"in Lead Number order and are decided {timeline.decision_days} days later. A run as of\n"
        f"{timeline.end} scores the leads not yet decided. docs/datasets/xeducation.md explains it."
    )
    settings = [
        ConfigEntry(
            "experiment_name", "xeducation", "Keep these models apart from other datasets'."
        ),
        ConfigEntry("conversion_model_name", "xeducation-conversion"),
        ConfigEntry("value_model_name", "xeducation-value"),
    ]
    sources = [
        SourceMapping(
            "leads",
            leads_sql(dialect, timeline),
            "Form fields and website behaviour only. Tags, Lead Quality, Lead Profile, the\n"
            "Asymmetrique indexes and scores, Last Activity, Last Notable Activity and the\n"
            "cheque agreement are filled in after contact and are not mapped.",
        ),
        SourceMapping("lead_events", None, "The export has no activity history."),
        SourceMapping(
            "opportunities",
            opportunities_sql(dialect, timeline),
            "One won opportunity per converted lead; nothing records lost deals.",
        ),
        SourceMapping("billing_accounts", None, "X Education has no billing data."),
        SourceMapping("invoices", None, "X Education has no billing data."),
    ]
    return GeneratedConfig("xeducation", header, settings, {}, sources)


def load_xeducation(
    data_dir: Path, url: str, timeline: XEducationTimeline | None = None
) -> LoadResult:
    """Land Leads.csv as a raw table at ``url`` and return the mappings and counts."""
    timeline = timeline or XEducationTimeline()
    return load_dataset(
        "xeducation",
        url,
        lambda: read_raw_tables(data_dir),
        lambda dialect: build_config(dialect, timeline),
    )
