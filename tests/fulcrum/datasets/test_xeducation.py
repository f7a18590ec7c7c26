"""X Education mappings on real rows: placeholders, casing, leakage and the synthetic timeline."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from fulcrum.datasets import xeducation
from fulcrum.datasets.xeducation import (
    EXCLUDED_COLUMNS,
    FEATURE_COLUMNS,
    XEducationTimeline,
    build_config,
    load_xeducation,
    read_raw_tables,
)
from tests.fulcrum.datasets.conftest import rows_by_id

pytestmark = pytest.mark.realdata

# Real Prospect IDs, each chosen for one quirk of the file.
SPECIALIZATION_SELECT = "7927b2df-8bba-4d29-b9a2-b6e0beafe620"  # also the highest Lead Number
SPECIALIZATION_BLANK = "2058ef08-2858-443e-a01f-a9237db2f5ce"
SOURCE_LOWER_GOOGLE = "2b5fb07b-5930-4e1f-a1f6-21f8a333ee2c"
SOURCE_GOOGLE = "3256f628-e534-4826-9d63-4a8b88782852"  # converted
VISITS_BLANK = "895d4905-f534-4f18-915b-8d239a72b5dc"
DO_NOT_EMAIL_YES = "a8531c22-fcf1-48f8-a711-fb5abf98ad87"
LOWEST_LEAD_NUMBER = "571b5c8e-a5b2-4d57-8574-f2ffb06fdeff"  # converted
DUPLICATE_PAIR = ["59ffebe6-a451-4048-a23e-acfc50b05657", "8a6a95f0-7d2a-49d3-ad93-c297f6e7755a"]
ID_COLUMNS = ("Prospect ID", "Lead Number")
TIMELINE = XEducationTimeline()


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


@functools.cache
def _raw_leads(data_dir: Path) -> pd.DataFrame:
    return read_raw_tables(data_dir)[xeducation.RAW_LEADS]


@pytest.fixture
def full_frames(shared_data, extract_through_mapping):
    """All 9,240 leads through the mapping, as of the end of the synthetic timeline."""
    raw = {xeducation.RAW_LEADS: _raw_leads(shared_data)}
    return extract_through_mapping(raw, lambda dialect: build_config(dialect, TIMELINE), TIMELINE.end)


def by_id(frame: pd.DataFrame, column: str, value: str) -> pd.Series:
    rows = frame.loc[frame[column] == value]
    assert len(rows) == 1, f"expected one row with {column} = {value}, found {len(rows)}"
    return rows.iloc[0]


def test_trailing_comma_column_is_dropped(shared_data):
    raw = _raw_leads(shared_data)

    assert raw.shape == (9240, 37)
    assert not [column for column in raw.columns if column.startswith("Unnamed")]


def test_raw_columns_mapped_or_excluded(shared_data):
    raw = _raw_leads(shared_data)
    mapped = {column for column, _, _ in FEATURE_COLUMNS}

    assert mapped.isdisjoint(EXCLUDED_COLUMNS)
    assert mapped | set(EXCLUDED_COLUMNS) | set(ID_COLUMNS) == set(raw.columns)


def test_leaky_columns_are_not_lead_columns(full_frames):
    columns = set(full_frames.leads.columns)

    assert not columns & {"tags", "lead_quality", "lead_profile", "last_activity", "last_notable_activity"}
    assert {name for _, name, _ in FEATURE_COLUMNS} <= columns


def test_select_and_blank_are_missing(full_frames):
    leads = full_frames.leads

    assert pd.isna(by_id(leads, "lead_id", SPECIALIZATION_SELECT)["industry"])
    assert pd.isna(by_id(leads, "lead_id", SPECIALIZATION_BLANK)["industry"])
    assert "select" not in set(leads["industry"].dropna())
    assert "select" not in set(leads["city"].dropna())


def test_casing_variants_share_a_category(full_frames):
    leads = full_frames.leads

    assert by_id(leads, "lead_id", SOURCE_LOWER_GOOGLE)["channel"] == "google"
    assert by_id(leads, "lead_id", SOURCE_GOOGLE)["channel"] == "google"
    assert (leads["channel"] == "google").sum() == 2868 + 5


def test_text_numbers_and_flags(full_frames):
    leads = full_frames.leads

    assert pd.isna(by_id(leads, "lead_id", VISITS_BLANK)["total_visits"])
    assert by_id(leads, "lead_id", DO_NOT_EMAIL_YES)["do_not_email"] == 1
    assert by_id(leads, "lead_id", SOURCE_GOOGLE)["do_not_email"] == 0
    assert leads["page_views_per_visit"].max() == pytest.approx(55.0)


def test_duplicate_rows_stay_distinct_leads(shared_data, full_frames):
    raw = rows_by_id(_raw_leads(shared_data), "Prospect ID", DUPLICATE_PAIR)
    leads = full_frames.leads.loc[full_frames.leads["lead_id"].isin(DUPLICATE_PAIR)]

    assert raw.drop(columns=list(ID_COLUMNS)).duplicated(keep=False).all()
    assert len(leads) == 2
    assert leads["created_at"].nunique() == 2


def test_synthetic_timeline_follows_lead_number(shared_data, full_frames):
    leads = full_frames.leads.set_index("lead_id")
    numbers = _raw_leads(shared_data).set_index("Prospect ID")["Lead Number"].astype(int)
    in_number_order = leads.loc[numbers.sort_values().index, "created_at"]

    assert leads.loc[LOWEST_LEAD_NUMBER, "created_at"] == ts("2020-01-01 00:00:00")
    assert leads.loc[SPECIALIZATION_SELECT, "created_at"] == ts("2020-12-30 23:59:59")
    assert in_number_order.is_monotonic_increasing


def test_leads_decided_after_30_days(full_frames):
    leads = full_frames.leads.set_index("lead_id")
    won = by_id(full_frames.opportunities, "lead_id", LOWEST_LEAD_NUMBER)
    lost = leads.loc[DUPLICATE_PAIR[0]]

    assert len(full_frames.opportunities) == 3561
    assert won["closed_at"] - won["created_at"] == pd.Timedelta(days=30)
    assert won["created_at"] == leads.loc[LOWEST_LEAD_NUMBER, "created_at"]
    assert pd.isna(leads.loc[LOWEST_LEAD_NUMBER, "disqualified_at"])
    assert lost["disqualified_at"] - lost["created_at"] == pd.Timedelta(days=30)


def test_undecided_leads_open_at_end(full_frames):
    leads = full_frames.leads
    decided = leads["disqualified_at"].notna() | leads["lead_id"].isin(
        full_frames.opportunities.loc[full_frames.opportunities["won"].fillna(False).astype(bool), "lead_id"]
    )
    recent = leads["created_at"] >= ts("2020-12-31") - pd.Timedelta(days=30)

    assert not decided[recent].any()
    assert decided[~recent].all()


@pytest.mark.postgres
def test_postgresql_mapping_matches_sqlite(shared_data, extract_through_mapping, postgres_url):
    ids = [SPECIALIZATION_SELECT, SOURCE_LOWER_GOOGLE, SOURCE_GOOGLE, VISITS_BLANK, LOWEST_LEAD_NUMBER]
    raw = {xeducation.RAW_LEADS: rows_by_id(_raw_leads(shared_data), "Prospect ID", ids)}

    def build(dialect):
        return build_config(dialect, TIMELINE)

    on_sqlite = extract_through_mapping(raw, build, TIMELINE.end)
    on_postgres = extract_through_mapping(raw, build, TIMELINE.end, url=postgres_url)

    for name in ("leads", "opportunities"):
        expected = getattr(on_sqlite, name).sort_values("lead_id").reset_index(drop=True)
        actual = getattr(on_postgres, name).sort_values("lead_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(
            actual.astype(object), expected.astype(object), check_exact=False, rtol=1e-12, obj=name
        )


def test_timeline_is_checked():
    with pytest.raises(ValueError, match="decision_days must be a positive integer. Got 0."):
        XEducationTimeline(decision_days=0)
    assert XEducationTimeline(start=dt.date(2021, 1, 1), span_days=10).end == dt.date(2021, 1, 11)


@pytest.mark.slow
def test_nightly_run_on_loaded_xeducation(shared_data, flow_settings_env, monkeypatch):
    from flows.nightly import nightly_scores

    url = f"sqlite:///{flow_settings_env / 'xeducation.db'}"
    result = load_xeducation(shared_data, url)
    (flow_settings_env / "fulcrum.toml").write_text(result.config.render())
    # Two training snapshots instead of six keep the run short. The doc reports six.
    monkeypatch.setenv("FULCRUM_MODEL__SNAPSHOT_COUNT", "2")

    run = nightly_scores(as_of=TIMELINE.end)

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        scores = pd.read_sql_table("lead_scores", connection)
    engine.dispose()
    assert run.status == "succeeded"
    assert run.leads_scored == len(scores) > 0
    assert scores["predicted_ltv"].isna().all()
    assert set(scores["route"]) <= {"priority", "nurture"}
    assert run.accounts_labelled == 0
    assert any("skipped LTV labels and the value model" in note for note in run.notes)
    assert run.metrics["conversion"]["roc_auc"] > 0.5
