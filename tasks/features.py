"""Features: point-in-time lead features, and the training sets of both models.

A feature at time ``t`` uses only what existed before ``t``: lead attributes, and activity
events that occurred before ``t``. Training rows for the conversion model are open leads
at snapshot times far enough in the past that their whole horizon is observed before the
cutoff; the label is a won opportunity closed within the horizon after the snapshot.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fulcrum.contract import LEADS
from fulcrum.settings import Settings
from tasks.extract import SourceFrames

logger = logging.getLogger(__name__)

ACTIVITY_WINDOWS_DAYS = (7, 30, 90)
MAX_EVENT_TYPES = 20
MAX_CATEGORICAL_LEVELS = 200
DAY = pd.Timedelta(days=1)

# Lead columns that are never features: keys and facts about the lead's outcome.
NON_FEATURE_LEAD_COLUMNS = {"lead_id", "created_at", "disqualified_at"}


@dataclass
class FeatureSet:
    """One row per (lead, feature time): ``lead_id``, ``feature_time`` and model inputs."""

    frame: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def input_columns(self) -> list[str]:
        return self.numeric + self.categorical


def slugify_event_type(event_type: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", str(event_type).lower()).strip("_")
    return slug[:40] or "unnamed"


def select_event_types(events: pd.DataFrame) -> list[str]:
    """Return the most frequent event type slugs, at most MAX_EVENT_TYPES of them, sorted."""
    if events.empty:
        return []
    counts = events["event_type"].map(slugify_event_type).value_counts()
    return sorted(counts.index[:MAX_EVENT_TYPES].tolist())


def event_types_from_columns(columns: list[str]) -> list[str]:
    """Recover the event type slugs a trained model expects from its input column names."""
    return sorted({m.group(1) for c in columns if (m := re.fullmatch(r"evt_(.+)_30d", c))})


def lead_attribute_columns(leads: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Split lead attribute columns into numeric and categorical model inputs.

    Extra columns beyond the contract are candidate features: numbers and booleans become
    numeric inputs, text becomes categorical unless it is nearly unique per lead (an id or
    free text), and timestamps are left out because their meaning is unknown.
    """
    numeric, categorical = [], []
    for name in leads.columns:
        if name in NON_FEATURE_LEAD_COLUMNS:
            continue
        values = leads[name]
        if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
            continue
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            numeric.append(name)
            continue
        distinct = values.nunique(dropna=True)
        if name in LEADS.column_names or distinct <= max(MAX_CATEGORICAL_LEVELS, 0.05 * len(values)):
            categorical.append(name)
    return numeric, categorical


def lead_attributes(leads: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """Return the attribute inputs with uniform types: float64 with NaN, object with None."""
    attributes = pd.DataFrame({"lead_id": leads["lead_id"].to_numpy()})
    for name in numeric:
        values = leads[name]
        if pd.api.types.is_bool_dtype(values) or values.dtype == object:
            values = values.astype("object").map(_boolean_or_number)
        attributes[name] = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    for name in categorical:
        values = leads[name].astype("object")
        attributes[name] = values.where(values.notna(), None).map(
            lambda value: value if value is None else str(value).strip() or None
        ).to_numpy()
    return attributes


def _boolean_or_number(value):
    if value is None or value is pd.NA:
        return np.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    return value


def first_conversions(opportunities: pd.DataFrame) -> pd.Series:
    """Return the first won close time per lead id."""
    won = opportunities.loc[opportunities["won"].fillna(False).astype(bool) & opportunities["closed_at"].notna()]
    return won.groupby("lead_id")["closed_at"].min()


def activity_features(
    events: pd.DataFrame, points: pd.DataFrame, event_types: list[str]
) -> pd.DataFrame:
    """Count each lead's events before its feature time, by type and window.

    ``points`` has ``lead_id`` and ``feature_time``; the result has one row per point in the
    same order. Feature times are expected to take few distinct values (snapshots).
    """
    columns = activity_feature_columns(event_types)
    result = pd.DataFrame(0.0, index=points.index, columns=columns)
    result["days_since_last_event"] = np.nan
    result["days_since_first_event"] = np.nan
    if events.empty or points.empty:
        return result

    events = events[["lead_id", "event_type", "occurred_at"]]
    slugs = events["event_type"].map(slugify_event_type)
    events = events.assign(slug=slugs.where(slugs.isin(event_types), "__other__"))
    for feature_time, group in points.groupby("feature_time", sort=False):
        window = events.loc[
            (events["occurred_at"] < feature_time) & events["lead_id"].isin(group["lead_id"])
        ]
        if window.empty:
            continue
        age_days = (feature_time - window["occurred_at"]) / DAY
        window = window.assign(age_days=age_days.to_numpy())
        summary = _summarise_window(window, event_types)
        rows = group[["lead_id"]].join(summary, on="lead_id")
        rows = rows.drop(columns="lead_id")
        filled = rows.fillna({name: 0.0 for name in columns})
        result.loc[group.index, filled.columns] = filled.to_numpy(dtype="float64")
    return result


def activity_feature_columns(event_types: list[str]) -> list[str]:
    columns = [f"events_{days}d" for days in ACTIVITY_WINDOWS_DAYS] + ["events_total", "distinct_event_types"]
    for slug in event_types:
        columns += [f"evt_{slug}_30d", f"evt_{slug}_total"]
    return columns


def _summarise_window(window: pd.DataFrame, event_types: list[str]) -> pd.DataFrame:
    by_lead = window.groupby("lead_id")
    summary = pd.DataFrame(index=by_lead.size().index)
    for days in ACTIVITY_WINDOWS_DAYS:
        recent = window.loc[window["age_days"] <= days]
        summary[f"events_{days}d"] = recent.groupby("lead_id").size()
    summary["events_total"] = by_lead.size()
    summary["distinct_event_types"] = by_lead["slug"].nunique()
    summary["days_since_last_event"] = by_lead["age_days"].min()
    summary["days_since_first_event"] = by_lead["age_days"].max()
    typed = window.loc[window["slug"] != "__other__"]
    if not typed.empty:
        totals = typed.groupby(["lead_id", "slug"]).size().unstack(fill_value=0)
        recent = typed.loc[typed["age_days"] <= 30].groupby(["lead_id", "slug"]).size().unstack(fill_value=0)
        for slug in event_types:
            if slug in totals.columns:
                summary[f"evt_{slug}_total"] = totals[slug]
            if slug in recent.columns:
                summary[f"evt_{slug}_30d"] = recent[slug]
    return summary.astype("float64")


def build_lead_features(
    leads: pd.DataFrame,
    events: pd.DataFrame,
    points: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    event_types: list[str] | None,
) -> FeatureSet:
    """Build features for each (lead_id, feature_time) in ``points``.

    ``event_types`` None leaves activity out (the value model uses attributes only).
    """
    points = points.reset_index(drop=True)
    attributes = lead_attributes(leads, numeric, categorical)
    created = leads[["lead_id", "created_at"]]
    frame = points.merge(created, on="lead_id", how="left", validate="many_to_one")
    frame = frame.merge(attributes, on="lead_id", how="left", validate="many_to_one")
    frame["lead_age_days"] = ((frame["feature_time"] - frame["created_at"]) / DAY).astype("float64")
    frame = frame.drop(columns="created_at")
    numeric_inputs = ["lead_age_days"] + numeric
    if event_types is not None:
        activity = activity_features(events, points, event_types)
        frame = pd.concat([frame, activity], axis=1)
        numeric_inputs += list(activity.columns)
    return FeatureSet(frame=frame, numeric=numeric_inputs, categorical=list(categorical))


def snapshot_times(cutoff: pd.Timestamp, settings: Settings) -> list[pd.Timestamp]:
    """Return training snapshot times, newest first, each with a fully observed horizon."""
    horizon = pd.Timedelta(days=settings.horizon_days)
    step = pd.Timedelta(days=settings.model.snapshot_step_days)
    return [cutoff - horizon - k * step for k in range(settings.model.snapshot_count)]


def conversion_times(lead_ids: pd.Series, converted_at: pd.Series) -> pd.Series:
    """Return each lead's first won close time, NaT for a lead that never converted.

    Aligned with ``lead_ids``. Unlike ``Series.map``, this keeps the timestamp dtype when no
    lead has converted at all, which pandas 3 would otherwise try to cast to float.
    """
    times = converted_at.astype("datetime64[ns, UTC]").reindex(lead_ids.to_numpy())
    return pd.Series(times.array, index=lead_ids.index)


def open_leads_at(leads: pd.DataFrame, converted_at: pd.Series, moment: pd.Timestamp) -> pd.DataFrame:
    """Leads created before ``moment`` that had neither converted nor been disqualified by then."""
    conversion = conversion_times(leads["lead_id"], converted_at)
    is_open = (
        (leads["created_at"] < moment)
        & ~(leads["disqualified_at"] < moment)
        & ~(conversion < moment)
    )
    return leads.loc[is_open.fillna(False).astype(bool)]


def build_conversion_training_set(frames: SourceFrames, cutoff: pd.Timestamp, settings: Settings) -> FeatureSet:
    """Open leads at each snapshot, with features at the snapshot and a within-horizon label."""
    leads = frames.leads
    converted_at = first_conversions(frames.opportunities)
    horizon = pd.Timedelta(days=settings.horizon_days)
    max_age = pd.Timedelta(days=settings.model.max_lead_age_days)

    points = []
    for snapshot in snapshot_times(cutoff, settings):
        candidates = open_leads_at(leads, converted_at, snapshot)
        candidates = candidates.loc[snapshot - candidates["created_at"] <= max_age]
        if candidates.empty:
            continue
        conversion = conversion_times(candidates["lead_id"], converted_at)
        label = ((conversion >= snapshot) & (conversion < snapshot + horizon)).fillna(False)
        points.append(
            pd.DataFrame(
                {
                    "lead_id": candidates["lead_id"].to_numpy(),
                    "feature_time": snapshot,
                    "label": label.astype("int64").to_numpy(),
                }
            )
        )
    if not points:
        points_frame = pd.DataFrame(
            {"lead_id": pd.Series(dtype=object), "feature_time": pd.Series(dtype="datetime64[ns, UTC]"),
             "label": pd.Series(dtype="int64")}
        )
    else:
        points_frame = pd.concat(points, ignore_index=True)
    if len(points_frame) > settings.model.max_training_rows:
        # A uniform sample keeps the base rate, so calibration stays honest.
        points_frame = points_frame.sample(
            n=settings.model.max_training_rows, random_state=settings.model.random_seed
        ).sort_index()

    numeric, categorical = lead_attribute_columns(leads)
    event_types = select_event_types(frames.lead_events)
    features = build_lead_features(
        leads, frames.lead_events, points_frame[["lead_id", "feature_time"]], numeric, categorical, event_types
    )
    features.frame["label"] = points_frame["label"].to_numpy()
    features.extra = {"event_types": event_types, "snapshots": len(points)}
    return features


def build_value_training_set(
    frames: SourceFrames, account_ltv: pd.DataFrame, settings: Settings
) -> FeatureSet:
    """Converted leads with the attributes known at conversion and their account's LTV."""
    opportunities = frames.opportunities
    won = opportunities.loc[
        opportunities["won"].fillna(False).astype(bool)
        & opportunities["closed_at"].notna()
        & opportunities["account_id"].notna()
    ].sort_values("closed_at")
    won = won.drop_duplicates("account_id", keep="first").drop_duplicates("lead_id", keep="first")
    ltv = pd.to_numeric(account_ltv["ltv"], errors="coerce")
    labelled = account_ltv.loc[ltv.notna() & (ltv > 0), ["account_id", "ltv"]]
    rows = won.merge(labelled, on="account_id", how="inner")
    rows = rows.loc[rows["lead_id"].isin(frames.leads["lead_id"])]

    numeric, categorical = lead_attribute_columns(frames.leads)
    points = pd.DataFrame(
        {
            "lead_id": rows["lead_id"].to_numpy(),
            "feature_time": pd.to_datetime(rows["closed_at"], utc=True).astype("datetime64[ns, UTC]").to_numpy(),
        }
    )
    points["feature_time"] = points["feature_time"].astype("datetime64[ns, UTC]")
    features = build_lead_features(frames.leads, frames.lead_events, points, numeric, categorical, None)
    # Lead age at conversion is not known for an open lead, so it is not a value input.
    features.frame = features.frame.drop(columns="lead_age_days")
    features.numeric = [name for name in features.numeric if name != "lead_age_days"]
    features.frame["ltv"] = rows["ltv"].to_numpy(dtype="float64")
    features.frame["account_id"] = rows["account_id"].to_numpy()
    return features


def build_scoring_features(
    frames: SourceFrames, cutoff: pd.Timestamp, event_types: list[str]
) -> FeatureSet:
    """Features at the cutoff for every open lead: not converted and not disqualified."""
    converted_at = first_conversions(frames.opportunities)
    open_leads = open_leads_at(frames.leads, converted_at, cutoff)
    numeric, categorical = lead_attribute_columns(frames.leads)
    points = pd.DataFrame({"lead_id": open_leads["lead_id"].to_numpy(), "feature_time": cutoff})
    points["feature_time"] = points["feature_time"].astype("datetime64[ns, UTC]")
    return build_lead_features(frames.leads, frames.lead_events, points, numeric, categorical, event_types)


@task(name="build-training-sets", cache_policy=NO_CACHE)
def build_training_sets_task(
    frames: SourceFrames, account_ltv: pd.DataFrame, cutoff: pd.Timestamp, settings: Settings
) -> tuple[FeatureSet, FeatureSet]:
    run_logger = get_run_logger()
    conversion = build_conversion_training_set(frames, cutoff, settings)
    value = build_value_training_set(frames, account_ltv, settings)
    positives = int(conversion.frame["label"].sum()) if len(conversion.frame) else 0
    run_logger.info(
        "Built training sets: conversion %d rows (%d converted within %d days) from %d snapshots; "
        "value %d converted accounts with an LTV label",
        len(conversion.frame), positives, settings.horizon_days,
        conversion.extra.get("snapshots", 0), len(value.frame),
    )
    return conversion, value
