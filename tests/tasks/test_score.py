"""Tests for tasks/score.py: overlay, ranks, routes, chunked scoring and the frontier."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tasks.score import (
    FRONTIER_WEIGHTS,
    SCORE_COLUMNS,
    compute_frontier,
    compute_frontier_task,
    is_high,
    overlay_scores,
    plot_frontier,
    rank_descending,
    score_leads,
    score_leads_task,
)
from tasks.train import ChampionModel, FeatureSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def column_model(
    kind: str, column: str, version: str, calls: list[int] | None = None
) -> ChampionModel:
    """A stand-in champion that returns one feature column as its prediction."""

    def predict(prepared: pd.DataFrame) -> np.ndarray:
        if calls is not None:
            calls.append(len(prepared))
        return prepared[column].to_numpy()

    return ChampionModel(
        kind=kind,
        model_name=f"test-{kind}",
        version=version,
        spec=FeatureSpec(numeric=[column], categorical=[]),
        predict_fn=predict,
    )


@pytest.fixture
def conversion_model() -> ChampionModel:
    return column_model("conversion", "p_true", "7")


@pytest.fixture
def value_model() -> ChampionModel:
    return column_model("value", "v_true", "3")


@pytest.fixture
def five_leads() -> pd.DataFrame:
    # p * v: a 50, b 120, c 49.9, d 60, e 8. No two leads tie on p, v or p * v.
    return pd.DataFrame(
        {
            "lead_id": ["a", "b", "c", "d", "e"],
            "feature_time": pd.Timestamp("2024-06-01", tz="UTC"),
            "p_true": [0.50, 0.40, 0.0499, 0.30, 0.20],
            "v_true": [100.0, 300.0, 1000.0, 200.0, 40.0],
        }
    )


def order_by(frame: pd.DataFrame, rank_column: str) -> list[str]:
    return frame.sort_values(rank_column)["lead_id"].tolist()


@pytest.mark.parametrize(
    ("weight", "expected_order"),
    [
        (0.0, ["a", "b", "d", "e", "c"]),  # by p
        (1.0, ["c", "b", "d", "a", "e"]),  # by v
        (0.5, ["b", "d", "a", "c", "e"]),  # by p * v
    ],
)
def test_overlay_order_at_weight(
    weight, expected_order, five_leads, conversion_model, value_model, settings_factory
):
    settings = settings_factory(overlay_weight=weight)

    scores = score_leads(five_leads, conversion_model, value_model, settings)

    assert order_by(scores, "rank_overlay") == expected_order


def test_overlay_ranks_match_axis_ranks(
    five_leads, conversion_model, value_model, settings_factory
):
    cases = ((0.0, "rank_volume"), (1.0, "rank_value"), (0.5, "rank_expected_value"))
    for weight, rank_column in cases:
        settings = settings_factory(overlay_weight=weight)
        scores = score_leads(five_leads, conversion_model, value_model, settings)
        assert scores["rank_overlay"].tolist() == scores[rank_column].tolist(), weight


def test_overlay_at_half_weight_is_geometric_mean():
    p = np.array([0.25, 0.5])
    v = np.array([400.0, 2.0])

    assert overlay_scores(p, v, 0.5) == pytest.approx([10.0, 1.0])
    assert overlay_scores(p, v, 0.0) == pytest.approx(p)
    assert overlay_scores(p, v, 1.0) == pytest.approx(v)


def test_overlay_zero_probability_is_finite():
    overlay = overlay_scores(np.array([0.0, 0.1]), np.array([1000.0, 0.0]), 0.5)

    assert np.isfinite(overlay).all()
    assert (overlay > 0).all()
    assert overlay[0] == pytest.approx(math.sqrt(1e-12 * 1000.0))


def test_overlay_weight_outside_unit_interval_raises():
    with pytest.raises(ValueError, match="between 0 and 1"):
        overlay_scores(np.array([0.1]), np.array([1.0]), 1.5)


def test_rank_ties_broken_by_lead_id():
    ranks = rank_descending(np.array([0.5, 0.5, 0.9, np.nan]), pd.Series(["b", "a", "c", "d"]))

    assert ranks.iloc[:3].tolist() == [3, 2, 1]
    assert ranks.isna().tolist() == [False, False, False, True]


def test_score_columns_and_values(five_leads, conversion_model, value_model, settings_factory):
    settings = settings_factory(overlay_weight=0.5)

    scores = score_leads(five_leads, conversion_model, value_model, settings)

    assert list(scores.columns) == SCORE_COLUMNS
    first = scores.iloc[0]
    assert first["p_convert"] == 0.5
    assert first["predicted_ltv"] == 100.0
    assert first["expected_value"] == pytest.approx(50.0)
    assert first["overlay_score"] == pytest.approx(math.sqrt(50.0))
    assert first["overlay_weight"] == 0.5
    assert set(scores["conversion_model_version"]) == {"7"}
    assert set(scores["value_model_version"]) == {"3"}
    assert scores["rank_volume"].dtype == np.int64
    assert scores["rank_overlay"].dtype == np.int64


def test_routes_by_quantile_thresholds(conversion_model, value_model, settings_factory):
    leads = pd.DataFrame(
        {
            "lead_id": ["L1", "L2", "L3", "L4"],
            "p_true": [0.9, 0.8, 0.2, 0.1],
            "v_true": [100.0, 10.0, 200.0, 5.0],
        }
    )
    # Medians: p 0.5 (between 0.8 and 0.2), v 55 (between 100 and 10).
    settings = settings_factory(routes={"probability_quantile": 0.5, "value_quantile": 0.5})

    scores = score_leads(leads, conversion_model, value_model, settings)

    assert scores["route"].tolist() == ["priority", "self_serve", "sales_rep", "nurture"]


def test_route_threshold_is_inclusive(conversion_model, value_model, settings_factory):
    leads = pd.DataFrame(
        {"lead_id": ["L1", "L2", "L3"], "p_true": [0.1, 0.2, 0.3], "v_true": [30.0, 20.0, 10.0]}
    )
    # The 0.5 quantiles are exactly 0.2 and 20.0, so L2 is high on both axes.
    settings = settings_factory(routes={"probability_quantile": 0.5, "value_quantile": 0.5})

    scores = score_leads(leads, conversion_model, value_model, settings)

    assert scores["route"].tolist() == ["sales_rep", "priority", "self_serve"]


def test_ties_at_lowest_score_are_low():
    # Eight of ten leads share the lowest probability, so the 0.7 quantile is that value.
    p_convert = np.array([0.01] * 8 + [0.5, 0.9])

    high = is_high(p_convert, 0.7)

    assert high.tolist() == [False] * 8 + [True, True]


def test_equal_scores_are_all_low():
    high = is_high(np.array([0.3, 0.3, 0.3]), 0.5)

    assert high.tolist() == [False, False, False]


def test_score_without_value_model(five_leads, conversion_model, settings_factory):
    settings = settings_factory(overlay_weight=0.8, routes={"probability_quantile": 0.6})

    scores = score_leads(five_leads, conversion_model, None, settings)

    assert scores["predicted_ltv"].isna().all()
    assert scores["expected_value"].isna().all()
    assert scores["rank_value"].isna().all()
    assert scores["rank_expected_value"].isna().all()
    assert scores["value_model_version"].isna().all()
    assert scores["overlay_score"].tolist() == scores["p_convert"].tolist()
    assert (scores["overlay_weight"] == 0.0).all()
    assert scores["rank_overlay"].tolist() == scores["rank_volume"].tolist()
    # The 0.6 quantile of p (0.0499, 0.2, 0.3, 0.4, 0.5) is 0.34, so a and b are high.
    assert scores["route"].tolist() == ["priority", "priority", "nurture", "nurture", "nurture"]


def test_scoring_in_chunks_matches_one_pass(value_model, settings_factory):
    rng = np.random.default_rng(3)
    n_leads = 2500
    leads = pd.DataFrame(
        {
            "lead_id": [f"L{index:05d}" for index in range(n_leads)],
            "p_true": rng.uniform(0, 1, n_leads),
            "v_true": rng.lognormal(5, 1, n_leads),
        }
    )
    calls: list[int] = []
    chunked_model = column_model("conversion", "p_true", "1", calls)

    scores = score_leads(leads, chunked_model, value_model, settings_factory(chunk_rows=1000))

    assert calls == [1000, 1000, 500]
    assert scores["p_convert"].tolist() == leads["p_true"].tolist()
    expected_ranks = leads["p_true"].rank(ascending=False).astype(int)
    assert scores["rank_volume"].tolist() == expected_ranks.tolist()
    assert sorted(scores["rank_overlay"]) == list(range(1, n_leads + 1))


def test_duplicate_lead_ids_raise(five_leads, conversion_model, settings_factory):
    five_leads.loc[1, "lead_id"] = "a"

    with pytest.raises(ValueError, match=r"duplicate lead_id values, such as \['a'\]"):
        score_leads(five_leads, conversion_model, None, settings_factory())


def test_probability_outside_unit_interval_raises(five_leads, settings_factory):
    five_leads.loc[0, "p_true"] = 1.5
    model = column_model("conversion", "p_true", "9")

    with pytest.raises(ValueError, match="version 9 returned 1 values outside"):
        score_leads(five_leads, model, None, settings_factory())


@pytest.fixture
def four_scores() -> pd.DataFrame:
    # p * v: A 50, B 120, C 50, D 60.
    return pd.DataFrame(
        {
            "lead_id": ["A", "B", "C", "D"],
            "p_convert": [0.5, 0.4, 0.05, 0.3],
            "predicted_ltv": [100.0, 300.0, 1000.0, 200.0],
        }
    )


def test_frontier_sums_for_top_two(four_scores):
    frontier = compute_frontier(four_scores, capacity=2).set_index("overlay_weight")

    # w=0 takes A and B (highest p), w=0.5 B and D (highest p*v), w=1 C and B (highest v).
    assert frontier.loc[0.0, "expected_conversions"] == pytest.approx(0.9)
    assert frontier.loc[0.0, "expected_value"] == pytest.approx(170.0)
    assert frontier.loc[0.5, "expected_conversions"] == pytest.approx(0.7)
    assert frontier.loc[0.5, "expected_value"] == pytest.approx(180.0)
    assert frontier.loc[1.0, "expected_conversions"] == pytest.approx(0.45)
    assert frontier.loc[1.0, "expected_value"] == pytest.approx(170.0)


def test_frontier_has_one_row_per_weight(four_scores):
    frontier = compute_frontier(four_scores, capacity=2)

    expected_columns = ["overlay_weight", "capacity", "expected_conversions", "expected_value"]
    expected_weights = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert list(frontier.columns) == expected_columns
    assert frontier["overlay_weight"].tolist() == expected_weights
    assert frontier["overlay_weight"].tolist() == list(FRONTIER_WEIGHTS)
    assert (frontier["capacity"] == 2).all()


def test_frontier_large_capacity_takes_all(four_scores):
    frontier = compute_frontier(four_scores, capacity=10)

    assert frontier["expected_conversions"].tolist() == pytest.approx([1.25] * 11)
    assert frontier["expected_value"].tolist() == pytest.approx([280.0] * 11)


def test_frontier_without_values(four_scores):
    four_scores["predicted_ltv"] = np.nan

    frontier = compute_frontier(four_scores, capacity=2)

    assert frontier["expected_conversions"].tolist() == pytest.approx([0.9] * 11)
    assert frontier["expected_value"].isna().all()


def test_frontier_rejects_partly_missing_values(four_scores):
    four_scores.loc[0, "predicted_ltv"] = np.nan

    with pytest.raises(ValueError, match="NULL on 1 of 4 leads"):
        compute_frontier(four_scores, capacity=2)


@pytest.mark.parametrize("with_values", [True, False])
def test_plot_frontier_returns_png(four_scores, with_values):
    if not with_values:
        four_scores["predicted_ltv"] = np.nan

    png = plot_frontier(compute_frontier(four_scores, capacity=2))

    assert png.startswith(PNG_SIGNATURE)


def test_prefect_tasks_run_without_server(
    five_leads, conversion_model, value_model, settings_factory
):
    scores = score_leads_task.fn(five_leads, conversion_model, value_model, settings_factory())
    frontier = compute_frontier_task.fn(scores, 2)

    assert len(scores) == 5
    assert len(frontier) == 11
