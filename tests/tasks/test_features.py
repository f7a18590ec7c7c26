"""Lead features are point in time, and training sets are labelled within the horizon."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.extract import SourceFrames
from tasks.features import (
    activity_features,
    build_conversion_training_set,
    build_scoring_features,
    build_value_training_set,
    event_types_from_columns,
    lead_attribute_columns,
    select_event_types,
)
from tests.helpers.sources import tiny_sources, ts


def frames_from(sources: dict[str, pd.DataFrame]) -> SourceFrames:
    sources = {name: frame.copy() for name, frame in sources.items()}
    for frame in sources.values():
        for column in frame.columns:
            if column.endswith("_at") or column.startswith("period_"):
                frame[column] = pd.to_datetime(frame[column], utc=True)
    sources["opportunities"]["won"] = sources["opportunities"]["won"].astype("boolean")
    return SourceFrames(**sources)


def test_activity_counts_by_window_and_type():
    frames = frames_from(tiny_sources())
    points = pd.DataFrame({"lead_id": ["L1"], "feature_time": [ts("2024-02-01")]})

    activity = activity_features(frames.lead_events, points, ["demo_request", "page_view"])

    row = activity.iloc[0]
    assert row["events_7d"] == 0
    assert row["events_30d"] == 2
    assert row["events_total"] == 2
    assert row["distinct_event_types"] == 2
    assert row["days_since_last_event"] == 12
    assert row["days_since_first_event"] == 26
    assert row["evt_page_view_30d"] == 1
    assert row["evt_demo_request_total"] == 1


def test_activity_of_lead_without_events():
    frames = frames_from(tiny_sources())
    points = pd.DataFrame({"lead_id": ["L2"], "feature_time": [ts("2024-02-10 12:00")]})

    activity = activity_features(frames.lead_events, points, ["page_view"])

    assert activity.loc[0, "events_total"] == 0
    assert pd.isna(activity.loc[0, "days_since_last_event"])


def test_events_after_feature_time_change_no_feature():
    frames = frames_from(tiny_sources())
    cutoff = ts("2024-04-01")
    before = build_scoring_features(frames, cutoff, ["page_view", "pricing_page_view"]).frame
    later_events = pd.DataFrame(
        {
            "lead_id": ["L2", "L3", "L3"],
            "event_type": ["page_view", "pricing_page_view", "trial_start"],
            "occurred_at": [cutoff, cutoff + pd.Timedelta(hours=1), ts("2024-06-01")],
        }
    )
    frames.lead_events = pd.concat([frames.lead_events, later_events], ignore_index=True)

    after = build_scoring_features(frames, cutoff, ["page_view", "pricing_page_view"]).frame

    pd.testing.assert_frame_equal(before, after)


def test_scoring_features_cover_open_leads_only():
    frames = frames_from(tiny_sources())

    features = build_scoring_features(frames, ts("2024-04-01"), ["page_view"])

    assert features.frame["lead_id"].tolist() == ["L2", "L3"]
    # L2: 2024-02-10 09:30 to 2024-04-01 00:00 is 50 days and 14.5 hours (2024 is a leap year).
    assert features.frame["lead_age_days"].tolist() == pytest.approx([50 + 14.5 / 24, 1 / (24 * 60)])


def test_disqualified_lead_is_not_open():
    sources = tiny_sources()
    sources["leads"].loc[2, "disqualified_at"] = ts("2024-03-31 23:59:30")
    frames = frames_from(sources)

    features = build_scoring_features(frames, ts("2024-04-01"), [])

    assert features.frame["lead_id"].tolist() == ["L2"]


def test_conversion_training_rows_and_labels(settings_factory):
    settings = settings_factory(horizon_days=30, model={"snapshot_count": 2, "snapshot_step_days": 30})
    frames = frames_from(tiny_sources())

    training = build_conversion_training_set(frames, ts("2024-04-01"), settings)

    rows = training.frame[["lead_id", "feature_time", "label"]].sort_values("feature_time")
    assert rows["lead_id"].tolist() == ["L1", "L2"]
    assert rows["feature_time"].tolist() == [ts("2024-02-01"), ts("2024-03-02")]
    assert rows["label"].tolist() == [1, 0]


def test_conversion_training_ignores_leads_older_than_max_age(settings_factory):
    settings = settings_factory(
        horizon_days=30, model={"snapshot_count": 1, "snapshot_step_days": 30, "max_lead_age_days": 10}
    )
    frames = frames_from(tiny_sources())

    training = build_conversion_training_set(frames, ts("2024-04-01"), settings)

    assert training.frame.empty


def test_value_training_set_uses_attributes_at_conversion(settings_factory):
    settings = settings_factory()
    frames = frames_from(tiny_sources())
    account_ltv = pd.DataFrame({"account_id": ["A1"], "ltv": [1234.0]})

    value = build_value_training_set(frames, account_ltv, settings)

    assert value.frame["lead_id"].tolist() == ["L1"]
    assert value.frame["ltv"].tolist() == [1234.0]
    assert value.frame["feature_time"].tolist() == [ts("2024-02-01")]
    assert "lead_age_days" not in value.input_columns
    assert not any(name.startswith("events_") for name in value.input_columns)


def test_attribute_columns_include_extra_lead_columns():
    leads = tiny_sources()["leads"].assign(country=["DE", "US", "US"], seats_requested=[5, 10, None])

    numeric, categorical = lead_attribute_columns(leads)

    assert numeric == ["employees", "seats_requested"]
    assert categorical == ["channel", "industry", "region", "seniority", "country"]


def test_event_types_round_trip_through_column_names():
    frames = frames_from(tiny_sources())
    event_types = select_event_types(frames.lead_events)
    columns = build_scoring_features(frames, ts("2024-04-01"), event_types).input_columns

    assert event_types == ["demo_request", "page_view", "pricing_page_view"]
    assert event_types_from_columns(columns) == event_types
