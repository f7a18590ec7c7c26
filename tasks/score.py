"""Score: champion models -> lead scores, volume/value overlay, routes and the frontier.

The overlay of a conversion probability p and a predicted LTV v with weight w is the weighted
geometric mean exp((1 - w) ln p + w ln v). At w = 0 it ranks by p alone, at w = 1 by v alone,
and at w = 0.5 it equals sqrt(p v), which ranks as the expected value p v. docs/models.md
lists the two exceptions: leads with p = 0, and exact ties in p v.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from fulcrum.timing import measured
from fulcrum.settings import Settings
from tasks.train import ChampionModel, render_png

logger = logging.getLogger(__name__)

# Probabilities and values are clipped to this floor before the logarithm, so a lead with
# p = 0 (isotonic calibration can return exact zeros) still gets a finite overlay score.
SCORE_FLOOR = 1e-12

FRONTIER_WEIGHTS = tuple(round(step / 10, 1) for step in range(11))

SCORE_COLUMNS = [
    "lead_id",
    "p_convert",
    "predicted_ltv",
    "expected_value",
    "overlay_weight",
    "overlay_score",
    "rank_volume",
    "rank_value",
    "rank_expected_value",
    "rank_overlay",
    "route",
    "conversion_model_version",
    "value_model_version",
]

FRONTIER_COLUMNS = ["overlay_weight", "capacity", "expected_conversions", "expected_value"]


def score_leads(
    features: pd.DataFrame,
    conversion: ChampionModel,
    value: ChampionModel | None,
    settings: Settings,
) -> pd.DataFrame:
    """Score open leads on both axes and rank them, one row per lead with SCORE_COLUMNS.

    Predictions run in chunks of ``settings.chunk_rows`` rows, and the ranks and route
    thresholds are computed over all leads afterwards. Without a value model, the value
    columns and ``rank_value``/``rank_expected_value`` are NULL, the overlay is p alone and
    ``overlay_weight`` is recorded as 0.0, the weight actually applied.
    """
    chunks = (
        features.iloc[start : start + settings.chunk_rows]
        for start in range(0, max(len(features), 1), settings.chunk_rows)
    )
    return score_feature_chunks(chunks, conversion, value, settings)


def score_feature_chunks(
    chunks: Iterable[pd.DataFrame],
    conversion: ChampionModel,
    value: ChampionModel | None,
    settings: Settings,
) -> pd.DataFrame:
    """Score open leads whose features arrive chunk by chunk, then rank them all together.

    Only the lead ids and the two predictions of each chunk are kept, so memory grows with
    the number of leads, not with the number of feature columns.
    """
    predictions = [predict_chunk(chunk, conversion, value, settings.chunk_rows) for chunk in chunks]
    return rank_predictions(predictions, conversion, value, settings)


def score_feature_chunks_on_dask(
    chunks: Iterable[pd.DataFrame],
    conversion: ChampionModel,
    value: ChampionModel | None,
    settings: Settings,
) -> pd.DataFrame:
    """Score like ``score_feature_chunks``, with each chunk a Prefect task on the Dask cluster.

    The cluster is the one at ``settings.dask_address``. Its workers need Fulcrum installed at
    the same version, and PREFECT_API_URL pointing at the Prefect server of this flow run.
    Chunks are sent as they are built, so the workers predict while the next chunk's features
    are computed here. Logs the same summary as the score-leads task.
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise RuntimeError(
            f"dask_address is set to {settings.dask_address!r}, but prefect-dask is not "
            "installed. Install Fulcrum with the 'dask' extra (pip install 'fulcrum[dask]'), "
            "or unset dask_address to score in this process"
        ) from exc

    with DaskTaskRunner(address=settings.dask_address) as runner:
        futures = [
            runner.submit(
                predict_chunk_task,
                {
                    "chunk": chunk,
                    "conversion": conversion,
                    "value": value,
                    "chunk_rows": settings.chunk_rows,
                },
            )
            for chunk in chunks
        ]
        predictions = [future.result() for future in futures]
    scores = rank_predictions(predictions, conversion, value, settings)
    report_scores(scores, len(predictions), conversion, value)
    return scores


def predict_chunk(
    chunk: pd.DataFrame, conversion: ChampionModel, value: ChampionModel | None, chunk_rows: int
) -> pd.DataFrame:
    """Return ``lead_id``, ``p_convert`` and ``predicted_ltv`` (NaN without a value model) per row."""
    if "lead_id" not in chunk.columns:
        raise ValueError("feature frame has no lead_id column; scoring needs one row per lead_id")
    p_convert = predict_in_chunks(conversion, chunk, chunk_rows)
    if value is not None:
        predicted_ltv = predict_in_chunks(value, chunk, chunk_rows)
    else:
        predicted_ltv = np.full(len(chunk), np.nan, dtype=np.float64)
    return pd.DataFrame(
        {
            "lead_id": chunk["lead_id"].to_numpy(dtype=object),
            "p_convert": p_convert,
            "predicted_ltv": predicted_ltv,
        }
    )


# Not wrapped with measured: Dask pickles this function by value, and the wrapper's
# thread-local state cannot be pickled. Its time is spent on the Dask workers anyway.
@task(name="predict-chunk", cache_policy=NO_CACHE)
def predict_chunk_task(
    chunk: pd.DataFrame, conversion: ChampionModel, value: ChampionModel | None, chunk_rows: int
) -> pd.DataFrame:
    return predict_chunk(chunk, conversion, value, chunk_rows)


def rank_predictions(
    predictions: list[pd.DataFrame],
    conversion: ChampionModel,
    value: ChampionModel | None,
    settings: Settings,
) -> pd.DataFrame:
    """Join the predictions of every chunk and rank them (see ``rank_scores``)."""
    if predictions:
        joined = pd.concat(predictions, ignore_index=True)
    else:
        joined = pd.DataFrame(
            {"lead_id": pd.Series(dtype=object), "p_convert": [], "predicted_ltv": []}
        )
    return rank_scores(
        joined["lead_id"].astype(object),
        joined["p_convert"].to_numpy(dtype=np.float64),
        joined["predicted_ltv"].to_numpy(dtype=np.float64),
        conversion,
        value,
        settings,
    )


def rank_scores(
    lead_ids: pd.Series,
    p_convert: np.ndarray,
    predicted_ltv: np.ndarray,
    conversion: ChampionModel,
    value: ChampionModel | None,
    settings: Settings,
) -> pd.DataFrame:
    """Build the score rows of all open leads from their predictions: overlay, ranks and routes."""
    lead_ids = lead_ids.reset_index(drop=True)
    _check_unique_leads(lead_ids)
    _check_probabilities(p_convert, conversion)
    if value is not None:
        _check_values(predicted_ltv, value)
        weight = settings.overlay_weight
    else:
        logger.info(
            "no value model: predicted_ltv, expected_value and rank_value are NULL, and the "
            "overlay ranks by p_convert alone (overlay_weight 0.0 instead of %s)",
            settings.overlay_weight,
        )
        predicted_ltv = np.full(len(lead_ids), np.nan)
        weight = 0.0

    expected_value = p_convert * predicted_ltv
    overlay = overlay_scores(p_convert, predicted_ltv if value is not None else None, weight)

    scores = pd.DataFrame(
        {
            "lead_id": lead_ids,
            "p_convert": p_convert,
            "predicted_ltv": predicted_ltv,
            "expected_value": expected_value,
            "overlay_weight": np.full(len(lead_ids), float(weight)),
            "overlay_score": overlay,
            "rank_volume": rank_descending(p_convert, lead_ids),
            "rank_value": rank_descending(predicted_ltv, lead_ids),
            "rank_expected_value": rank_descending(expected_value, lead_ids),
            "rank_overlay": rank_descending(overlay, lead_ids),
            "route": assign_routes(p_convert, predicted_ltv, settings),
            "conversion_model_version": conversion.version,
            "value_model_version": value.version if value is not None else None,
        }
    )
    scores["rank_volume"] = scores["rank_volume"].astype(np.int64)
    scores["rank_overlay"] = scores["rank_overlay"].astype(np.int64)
    scores["value_model_version"] = scores["value_model_version"].astype(object)
    return scores[SCORE_COLUMNS]


class MissingScoringInputError(ValueError):
    """The open leads' features lack columns that a champion model was trained on."""

    def __init__(self, model: ChampionModel, missing: list[str]):
        self.missing = list(missing)
        super().__init__(
            f"{model.kind} model {model.model_name} version {model.version} needs the input "
            f"column(s) {self.missing}, which today's features lack. Map the column(s) again "
            f"in the leads source, or run with retraining so that a model trained without "
            f"them becomes champion"
        )


def predict_in_chunks(model: ChampionModel, features: pd.DataFrame, chunk_rows: int) -> np.ndarray:
    """Predict one float per row, ``chunk_rows`` rows at a time, in the order of ``features``.

    Raises MissingScoringInputError before any prediction when an input column is absent.
    """
    missing = [name for name in model.spec.input_columns if name not in features.columns]
    if missing:
        raise MissingScoringInputError(model, missing)
    parts = [
        model.predict(features.iloc[start : start + chunk_rows])
        for start in range(0, len(features), chunk_rows)
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)


def overlay_scores(
    p_convert: np.ndarray, predicted_ltv: np.ndarray | None, weight: float
) -> np.ndarray:
    """Return exp((1 - w) ln p + w ln v) per lead, or p itself when there is no value.

    Both inputs are clipped below at SCORE_FLOOR first, so the score is finite and positive.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"overlay weight must be between 0 and 1. Got {weight!r}.")
    p_convert = np.asarray(p_convert, dtype=np.float64)
    if predicted_ltv is None:
        return p_convert.copy()

    log_p = np.log(np.clip(p_convert, SCORE_FLOOR, None))
    log_v = np.log(np.clip(np.asarray(predicted_ltv, dtype=np.float64), SCORE_FLOOR, None))
    return np.exp((1.0 - weight) * log_p + weight * log_v)


def rank_descending(scores: np.ndarray, lead_ids: pd.Series) -> pd.Series:
    """Rank scores from 1 (highest) to n without gaps, breaking ties by ascending lead_id.

    A NaN score gets a NULL rank, and the other scores are still ranked 1 to their count.
    Returns a nullable Int64 Series aligned with ``lead_ids`` by position.
    """
    table = pd.DataFrame(
        {"score": np.asarray(scores, dtype=np.float64), "lead_id": lead_ids.to_numpy()}
    )
    ranked = table[table["score"].notna()]
    ranked = ranked.sort_values(["score", "lead_id"], ascending=[False, True], kind="mergesort")

    ranks = pd.Series(pd.NA, index=table.index, dtype="Int64")
    ranks.loc[ranked.index] = np.arange(1, len(ranked) + 1)
    return ranks


def assign_routes(
    p_convert: np.ndarray, predicted_ltv: np.ndarray, settings: Settings
) -> np.ndarray:
    """Route each lead by quantile thresholds over all scored leads.

    High p means p at or above the ``routes.probability_quantile`` quantile of p (linear
    interpolation), high v likewise with ``routes.value_quantile`` (see ``is_high``). High p
    and high v -> priority, high p and low v -> self_serve, low p and high v -> sales_rep,
    both low -> nurture. Without value predictions (all NaN) high p -> priority and low p ->
    nurture.
    """
    p_convert = np.asarray(p_convert, dtype=np.float64)
    predicted_ltv = np.asarray(predicted_ltv, dtype=np.float64)
    routes = np.full(len(p_convert), "nurture", dtype=object)
    if len(p_convert) == 0:
        return routes

    high_p = is_high(p_convert, settings.routes.probability_quantile)
    if np.isnan(predicted_ltv).all():
        routes[high_p] = "priority"
        return routes

    high_v = is_high(predicted_ltv, settings.routes.value_quantile)
    routes[high_p & high_v] = "priority"
    routes[high_p & ~high_v] = "self_serve"
    routes[~high_p & high_v] = "sales_rep"
    return routes


def is_high(scores: np.ndarray, quantile: float) -> np.ndarray:
    """Return which scores are at or above their ``quantile`` quantile (linear interpolation).

    When that threshold is the lowest score, only scores above it are high. Isotonic
    calibration gives most leads the same lowest probability, and counting all of them as
    high would leave no lead low.
    """
    threshold = np.quantile(scores, quantile)
    if threshold <= scores.min():
        return scores > threshold
    return scores >= threshold


def compute_frontier(scores: pd.DataFrame, capacity: int) -> pd.DataFrame:
    """Trace volume against value: for w = 0.0, 0.1, ..., 1.0 take the top ``capacity`` leads.

    For each weight, leads are ranked by the overlay with that weight (ties by lead_id), and
    the top ``capacity`` give expected_conversions = sum of p and expected_value = sum of
    p x v. With fewer leads than ``capacity`` all are taken. Without value predictions every
    weight ranks by p and expected_value is NULL. One row per weight, columns FRONTIER_COLUMNS.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be a positive number of leads. Got {capacity!r}.")
    required = ("lead_id", "p_convert", "predicted_ltv")
    missing = [name for name in required if name not in scores.columns]
    if missing:
        raise ValueError(
            f"scores frame is missing column(s) {missing}; pass the output of score_leads"
        )

    p_convert = scores["p_convert"].to_numpy(dtype=np.float64)
    predicted_ltv = scores["predicted_ltv"].to_numpy(dtype=np.float64, na_value=np.nan)
    has_value = _has_value_predictions(predicted_ltv)
    lead_ids = scores["lead_id"].reset_index(drop=True)

    rows = []
    for weight in FRONTIER_WEIGHTS:
        overlay = overlay_scores(p_convert, predicted_ltv if has_value else None, weight)
        selected = (rank_descending(overlay, lead_ids) <= capacity).to_numpy(dtype=bool)
        rows.append(
            {
                "overlay_weight": weight,
                "capacity": int(capacity),
                "expected_conversions": float(p_convert[selected].sum()),
                "expected_value": (
                    float((p_convert[selected] * predicted_ltv[selected]).sum())
                    if has_value
                    else np.nan
                ),
            }
        )
    return pd.DataFrame(rows, columns=FRONTIER_COLUMNS)


def plot_frontier(frontier: pd.DataFrame) -> bytes:
    """Render the frontier as PNG bytes: expected conversions on x, expected value on y."""
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    conversions = frontier["expected_conversions"].to_numpy(dtype=np.float64)
    values = frontier["expected_value"].to_numpy(dtype=np.float64, na_value=np.nan)
    capacity = int(frontier["capacity"].iloc[0]) if len(frontier) else 0

    if len(frontier) and not np.isnan(values).all():
        axes.plot(conversions, values, marker="o")
        for weight, x, y in zip(frontier["overlay_weight"], conversions, values):
            axes.annotate(f"w={weight:.1f}", (x, y), textcoords="offset points", xytext=(4, 4))
        axes.set_xlabel("expected conversions of the selected leads")
        axes.set_ylabel("expected value of the selected leads")
        axes.set_title(f"Volume against value, top {capacity} leads")
    else:
        axes.plot(frontier["overlay_weight"], conversions, marker="o")
        axes.set_xlabel("overlay weight w")
        axes.set_ylabel("expected conversions of the selected leads")
        axes.set_title(f"No value model: expected conversions of the top {capacity} leads")
    return render_png(figure)


def _check_unique_leads(lead_ids: pd.Series) -> None:
    if lead_ids.isna().any():
        raise ValueError(
            f"feature frame has {int(lead_ids.isna().sum())} rows with lead_id NULL; "
            f"every scored row needs a lead_id"
        )
    duplicated = lead_ids[lead_ids.duplicated()]
    if len(duplicated):
        raise ValueError(
            f"feature frame has {len(duplicated)} duplicate lead_id values, such as "
            f"{duplicated.head(3).tolist()}; scoring needs one row per open lead"
        )


def _check_probabilities(p_convert: np.ndarray, model: ChampionModel) -> None:
    invalid = ~((p_convert >= 0.0) & (p_convert <= 1.0))
    if invalid.any():
        raise ValueError(
            f"conversion model {model.model_name} version {model.version} returned "
            f"{int(invalid.sum())} values outside [0, 1] or NaN; expected probabilities"
        )


def _check_values(predicted_ltv: np.ndarray, model: ChampionModel) -> None:
    invalid = ~np.isfinite(predicted_ltv)
    if invalid.any():
        raise ValueError(
            f"value model {model.model_name} version {model.version} returned "
            f"{int(invalid.sum())} NaN or infinite LTVs"
        )


def _has_value_predictions(predicted_ltv: np.ndarray) -> bool:
    missing = np.isnan(predicted_ltv)
    if missing.all():
        return False
    if missing.any():
        raise ValueError(
            f"predicted_ltv is NULL on {int(missing.sum())} of {len(missing)} leads; it must be "
            f"set on every lead (value model) or on none (no value model)"
        )
    return True


@task(name="score-leads", cache_policy=NO_CACHE)
@measured
def score_leads_task(
    features: pd.DataFrame | Iterable[pd.DataFrame],
    conversion: ChampionModel,
    value: ChampionModel | None,
    settings: Settings,
) -> pd.DataFrame:
    """Score the open leads with the champion models, from one feature frame or chunk by chunk."""
    chunks = [features] if isinstance(features, pd.DataFrame) else features
    predictions = [predict_chunk(chunk, conversion, value, settings.chunk_rows) for chunk in chunks]
    scores = rank_predictions(predictions, conversion, value, settings)
    report_scores(scores, len(predictions), conversion, value)
    return scores


def report_scores(
    scores: pd.DataFrame, chunks: int, conversion: ChampionModel, value: ChampionModel | None
) -> None:
    """Log how many leads were scored, with which models, and the count of each route."""
    route_counts = scores["route"].value_counts()
    routes = ("priority", "self_serve", "sales_rep", "nurture")
    _run_logger().info(
        "scored %d leads in %d chunk(s) with conversion version %s and value version %s; "
        "routes: priority %d, self_serve %d, sales_rep %d, nurture %d",
        len(scores),
        chunks,
        conversion.version,
        value.version if value is not None else "none",
        *(int(route_counts.get(route, 0)) for route in routes),
    )


@task(name="compute-frontier", cache_policy=NO_CACHE)
@measured
def compute_frontier_task(scores: pd.DataFrame, capacity: int) -> pd.DataFrame:
    """Compute the volume/value frontier for the rep capacity."""
    frontier = compute_frontier(scores, capacity)
    _run_logger().info(
        "frontier over %d leads for capacity %d: expected conversions %.1f at w=0.0 and "
        "%.1f at w=1.0",
        len(scores),
        capacity,
        frontier["expected_conversions"].iloc[0],
        frontier["expected_conversions"].iloc[-1],
    )
    return frontier


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    # Outside a flow run (tests calling `.fn`, notebooks) the module logger takes over.
    try:
        return get_run_logger()
    except MissingContextError:
        return logger
