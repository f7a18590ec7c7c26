"""Train: fit, evaluate, log and register the conversion and value models in MLflow.

Both models are scikit-learn pipelines that start from the frame `prepare_model_input`
returns. Each is evaluated on a time-based holdout, logged as one MLflow run, registered
as a new version, and given the alias ``champion`` only when it scores at least as well as
the current champion on that same holdout (within ``model.promotion_tolerance``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any, Literal

import mlflow
import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from scipy.stats import spearmanr
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.calibration import CalibratedClassifierCV, calibration_curve
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from fulcrum.timing import measured
from fulcrum.settings import Settings

logger = logging.getLogger(__name__)

ModelKind = Literal["conversion", "value"]

CHAMPION_ALIAS = "champion"
# Version tag set when a version takes the champion alias: the UTC time of the promotion.
# With the version's ``as_of`` tag it records which version was champion for which data date.
CHAMPION_FROM_TAG = "champion_from"
MISSING_CATEGORY = "__missing__"
RESERVED_COLUMNS = ("lead_id", "feature_time", "label", "ltv")

# Only the 63 most frequent categories of a column get their own code and the rest share one,
# so every categorical stays well under the 255 bins HistGradientBoosting allows per feature.
MAX_CATEGORIES = 64

# scikit-learn's CalibratedClassifierCV documentation advises against isotonic calibration
# with far fewer than 1,000 calibration samples because it overfits, so smaller calibration
# folds get a sigmoid instead.
MIN_ISOTONIC_ROWS_PER_FOLD = 1000

CONVERSION_BOOSTING_PARAMS: dict[str, Any] = {
    "learning_rate": 0.05,
    "max_iter": 200,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
}
# The value booster fits ln(LTV) with squared error. Smaller trees with larger leaves than the
# conversion model's, because converted accounts number hundreds to thousands, not millions.
VALUE_BOOSTING_PARAMS: dict[str, Any] = {
    "loss": "squared_error",
    "learning_rate": 0.05,
    "max_iter": 200,
    "max_leaf_nodes": 8,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
}

# skops rejects types outside its default allow-list when it loads a model. These are the
# ones the two pipelines contain (HistGradientBoosting trees, calibration maps, the CV
# splitter). They are trusted on the assumption that only this module writes to the registry.
SKOPS_TRUSTED_TYPES = [
    "tasks.train.SmearedLogRegressor",
    "functools.partial",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.utils.validation.check_array",
]

PRIMARY_METRIC: dict[str, str] = {"conversion": "roc_auc", "value": "spearman"}
PRIMARY_METRIC_LABEL: dict[str, str] = {"conversion": "ROC AUC", "value": "Spearman"}


class MissingFeatureError(ValueError):
    """A frame lacks columns that the model or the stage requires."""

    def __init__(self, missing: list[str], frame_name: str = "feature frame") -> None:
        self.missing = list(missing)
        super().__init__(
            f"{frame_name} is missing required column(s) {self.missing}; add them to the features "
            f"or retrain the model on the columns that exist"
        )


class InsufficientDataError(ValueError):
    """A training set is too small or too one-sided to fit and evaluate a model."""


@dataclass(frozen=True)
class FeatureSpec:
    """Model input columns: numeric ones (float64, NaN for missing) and categorical ones."""

    numeric: list[str]
    categorical: list[str]

    def __post_init__(self) -> None:
        columns = self.input_columns
        if not columns:
            raise ValueError("FeatureSpec needs at least one numeric or categorical column")
        duplicated = sorted({name for name in columns if columns.count(name) > 1})
        if duplicated:
            raise ValueError(
                f"FeatureSpec lists {duplicated} more than once; each column must be either "
                f"numeric or categorical, once"
            )
        reserved = [name for name in columns if name in RESERVED_COLUMNS]
        if reserved:
            raise ValueError(
                f"FeatureSpec must not use {reserved} as model inputs; "
                f"{list(RESERVED_COLUMNS)} are identifiers and targets"
            )

    @property
    def input_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def to_dict(self) -> dict[str, list[str]]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(numeric=list(data["numeric"]), categorical=list(data["categorical"]))


@dataclass
class TrainedModel:
    """A fitted pipeline with its holdout evaluation, ready to log and register.

    ``holdout_predictions`` has one row per holdout row: ``lead_id``, ``feature_time``, the
    prepared model input columns, ``actual`` (label or LTV) and ``predicted`` (probability or
    LTV). The champion is re-scored on these rows before promotion.
    """

    kind: ModelKind
    pipeline: Pipeline
    spec: FeatureSpec
    metrics: dict[str, float]
    holdout_predictions: pd.DataFrame
    plots: dict[str, bytes]
    n_train: int
    n_holdout: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.kind]

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Predict conversion probabilities or LTVs for a feature frame, one per row."""
        prepared = prepare_model_input(features, self.spec)
        if self.kind == "conversion":
            return self.pipeline.predict_proba(prepared)[:, 1]
        return self.pipeline.predict(prepared)


@dataclass
class ChampionModel:
    """A registered model version with a predict function over feature frames.

    ``predict_fn`` receives the output of `prepare_model_input` and returns one float per row:
    the probability of conversion, or the predicted LTV.
    """

    kind: ModelKind
    model_name: str
    version: str
    spec: FeatureSpec
    predict_fn: Callable[[pd.DataFrame], np.ndarray]
    run_id: str | None = None

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Predict one float per row of ``features``, after `prepare_model_input`."""
        prepared = prepare_model_input(features, self.spec)
        predictions = np.asarray(self.predict_fn(prepared), dtype=np.float64)
        if predictions.shape != (len(prepared),):
            raise ValueError(
                f"{self.kind} model {self.model_name} version {self.version} returned shape "
                f"{predictions.shape} for {len(prepared)} rows; expected one value per row"
            )
        return predictions

    @classmethod
    def from_trained(cls, trained: TrainedModel, model_name: str, version: str) -> ChampionModel:
        """Wrap a freshly trained model, for scoring without a registry round trip."""
        return cls(
            kind=trained.kind,
            model_name=model_name,
            version=version,
            spec=trained.spec,
            predict_fn=_model_output_function(trained.kind, trained.pipeline),
        )


@dataclass
class RegistrationResult:
    """Outcome of one training task: the version it registered, if any, and the champion."""

    kind: ModelKind
    model_name: str
    new_version: str | None
    champion_version: str | None
    promoted: bool
    reason: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_model_input(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Select and cast the model input columns, the same way at fit, log and score time.

    Numeric columns, including nullable ``Int64`` and ``boolean`` ones, become float64 with NaN
    for missing values and for infinities. Categorical columns become object dtype strings with
    `MISSING_CATEGORY` for missing values, so a NULL never changes a column's MLflow schema type.
    The index of ``frame`` is kept. Raises MissingFeatureError naming any absent column.
    """
    missing = [name for name in spec.input_columns if name not in frame.columns]
    if missing:
        raise MissingFeatureError(missing)

    columns: dict[str, pd.Series] = {}
    for name in spec.numeric:
        columns[name] = _to_float(frame[name], name)
    for name in spec.categorical:
        columns[name] = _to_category_labels(frame[name])

    return pd.DataFrame(columns, index=frame.index)[spec.input_columns]


def _to_float(series: pd.Series, name: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(series) or isinstance(
        series.dtype, pd.CategoricalDtype
    ):
        raise ValueError(
            f"numeric feature {name!r} has dtype {series.dtype}; cast it to a number in "
            f"the feature stage or list it as categorical"
        )

    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        values = series.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        as_objects = series.astype(object).where(series.notna(), None)
        try:
            numbers = pd.to_numeric(as_objects.map(_bool_to_int), errors="raise")
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"numeric feature {name!r} has non-numeric values such as "
                f"{_first_non_numeric(as_objects)!r}; fix the feature or list it as categorical"
            ) from exc
        values = numbers.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)

    infinite = np.isinf(values)
    if infinite.any():
        # HistGradientBoosting rejects infinities, and a ratio over zero is best read as missing.
        logger.warning(
            "numeric feature %r has %d infinite values; they are treated as missing",
            name,
            int(infinite.sum()),
        )
        values = np.where(infinite, np.nan, values)
    return pd.Series(values, index=series.index, dtype=np.float64)


def _bool_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, (bool, np.bool_)) else value


def _first_non_numeric(values: pd.Series) -> Any:
    for value in values.dropna():
        try:
            float(value)
        except (TypeError, ValueError):
            return value
    return None


def _to_category_labels(series: pd.Series) -> pd.Series:
    labels = [MISSING_CATEGORY if pd.isna(value) else str(value) for value in series.astype(object)]
    return pd.Series(labels, index=series.index, dtype=object)


def train_conversion_model(
    train_set: pd.DataFrame, spec: FeatureSpec, settings: Settings
) -> TrainedModel:
    """Fit the calibrated conversion classifier and evaluate it on the most recent rows.

    ``train_set`` has ``lead_id``, ``feature_time``, the spec's input columns and ``label``
    (1 if the lead converted within the horizon). The returned pipeline is the one fitted on
    the older rows only, so the holdout metrics describe exactly the model that is registered.
    """
    _require_columns(train_set, ["lead_id", "feature_time", "label"], "conversion training set")
    labels = _binary_labels(train_set["label"])
    model_settings = settings.model
    _check_class_counts(labels, model_settings.min_training_positives, "the training set")

    fit_positions, holdout_positions = split_by_time(train_set, model_settings.holdout_fraction)
    folds = model_settings.calibration_folds
    _check_fit_and_holdout_classes(labels, fit_positions, holdout_positions, folds)

    features = prepare_model_input(train_set, spec)
    spec = drop_empty_numeric_inputs(spec, features.iloc[fit_positions])
    features = features[spec.input_columns]
    fit_features = features.iloc[fit_positions]
    fit_labels = labels[fit_positions]
    method = choose_calibration_method(len(fit_positions), folds)
    pipeline = build_conversion_pipeline(spec, method, folds, model_settings.random_seed)
    pipeline.fit(fit_features, fit_labels)

    holdout_features = features.iloc[holdout_positions]
    holdout_labels = labels[holdout_positions]
    probabilities = pipeline.predict_proba(holdout_features)[:, 1]
    metrics = evaluate_conversion(holdout_labels, probabilities)

    params = {
        **{f"boosting_{key}": value for key, value in CONVERSION_BOOSTING_PARAMS.items()},
        **_shared_params(train_set, holdout_positions, spec, model_settings),
        "calibration_method": method,
        "calibration_folds": folds,
        "train_positives": int(fit_labels.sum()),
        "horizon_days": settings.horizon_days,
    }
    return TrainedModel(
        kind="conversion",
        pipeline=pipeline,
        spec=spec,
        metrics=metrics,
        holdout_predictions=_holdout_frame(
            train_set, holdout_features, holdout_positions, holdout_labels, probabilities
        ),
        plots={"calibration_curve.png": plot_calibration_curve(holdout_labels, probabilities)},
        n_train=len(fit_positions),
        n_holdout=len(holdout_positions),
        params=params,
    )


def train_value_model(
    train_set: pd.DataFrame, spec: FeatureSpec, settings: Settings
) -> TrainedModel:
    """Fit the LTV regressor for converted leads and evaluate it on the most recent rows.

    ``train_set`` has ``lead_id``, ``feature_time`` (the conversion time), the spec's input
    columns and ``ltv`` (> 0). Rows with a missing, infinite or non-positive LTV are dropped
    with a warning, because the model fits ln(LTV), which is defined only for positive values.
    """
    _require_columns(train_set, ["lead_id", "feature_time", "ltv"], "value training set")
    model_settings = settings.model

    ltv = pd.to_numeric(train_set["ltv"], errors="coerce").astype(np.float64)
    usable = ltv.notna() & (ltv > 0) & np.isfinite(ltv)
    n_dropped = int((~usable).sum())
    if n_dropped:
        logger.warning(
            "value training set has %d rows with a missing, infinite or non-positive ltv; "
            "they are dropped",
            n_dropped,
        )
    train_set = train_set.loc[usable.to_numpy()].reset_index(drop=True)
    ltv = ltv.loc[usable].to_numpy()

    minimum = model_settings.min_value_training_rows
    if len(train_set) < minimum:
        raise InsufficientDataError(
            f"value training set has {len(train_set)} rows with a positive ltv; "
            f"model.min_value_training_rows is {minimum}"
        )

    fit_positions, holdout_positions = split_by_time(train_set, model_settings.holdout_fraction)
    if len(holdout_positions) < 2:
        raise InsufficientDataError(
            f"value holdout has {len(holdout_positions)} rows; at least 2 are needed to compute "
            f"a rank correlation. Raise model.holdout_fraction or model.min_value_training_rows"
        )

    features = prepare_model_input(train_set, spec)
    spec = drop_empty_numeric_inputs(spec, features.iloc[fit_positions])
    features = features[spec.input_columns]
    pipeline = build_value_pipeline(spec, model_settings.random_seed)
    pipeline.fit(features.iloc[fit_positions], ltv[fit_positions])

    holdout_features = features.iloc[holdout_positions]
    actual = ltv[holdout_positions]
    predicted = pipeline.predict(holdout_features)
    metrics = evaluate_value(actual, predicted)

    params = {
        **{f"boosting_{key}": value for key, value in VALUE_BOOSTING_PARAMS.items()},
        **_shared_params(train_set, holdout_positions, spec, model_settings),
        "rows_dropped_nonpositive_ltv": n_dropped,
    }
    return TrainedModel(
        kind="value",
        pipeline=pipeline,
        spec=spec,
        metrics=metrics,
        holdout_predictions=_holdout_frame(
            train_set, holdout_features, holdout_positions, actual, predicted
        ),
        plots={"decile_plot.png": plot_value_deciles(actual, predicted)},
        n_train=len(fit_positions),
        n_holdout=len(holdout_positions),
        params=params,
    )


def drop_empty_numeric_inputs(spec: FeatureSpec, fit_features: pd.DataFrame) -> FeatureSpec:
    """Return ``spec`` without the numeric inputs that have no value on any fitting row.

    HistGradientBoosting in scikit-learn 1.9 raises "window shape cannot be larger than input
    array shape" on an all-NaN column. Such a column carries nothing, for example `employees`
    when the CRM never records it or activity recency when lead_events is absent.
    """
    empty = [name for name in spec.numeric if not fit_features[name].notna().any()]
    if not empty:
        return spec
    usable = [name for name in spec.numeric if name not in empty]
    if not usable and not spec.categorical:
        raise InsufficientDataError(
            f"every model input is empty on the fitting rows ({empty}); nothing can be learned"
        )
    logger.warning("left out numeric inputs with no value on the fitting rows: %s", empty)
    return FeatureSpec(numeric=usable, categorical=list(spec.categorical))


def _shared_params(
    train_set: pd.DataFrame, holdout_positions: np.ndarray, spec: FeatureSpec, model_settings
) -> dict[str, Any]:
    """Return the MLflow params that both models log."""
    return {
        "holdout_fraction": model_settings.holdout_fraction,
        "holdout_start": _timestamp_text(train_set["feature_time"].iloc[holdout_positions].min()),
        "random_seed": model_settings.random_seed,
        "max_categories": MAX_CATEGORIES,
        "n_numeric": len(spec.numeric),
        "n_categorical": len(spec.categorical),
    }


def split_by_time(frame: pd.DataFrame, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into older fitting rows and the most recent holdout rows, as positions.

    The holdout is about ``holdout_fraction`` of the rows. Whenever that leaves rows on both
    sides, it is made of whole feature times, so a training snapshot is never split. Of the two
    whole-time cuts around the target size, the one closer to the target wins, and the smaller
    one on a tie. When every row has the same feature time, the rows are split by position in
    ``lead_id`` order.
    """
    n_rows = len(frame)
    if n_rows < 2:
        raise InsufficientDataError(f"a time-based holdout needs at least 2 rows; got {n_rows}")

    feature_time = frame["feature_time"]
    if not pd.api.types.is_datetime64_any_dtype(feature_time):
        raise ValueError(
            f"feature_time must be a UTC datetime column. Got dtype {feature_time.dtype}."
        )
    if feature_time.isna().any():
        raise ValueError(
            f"feature_time is missing on {int(feature_time.isna().sum())} rows; "
            f"every training row needs a feature time"
        )

    ordered = frame[["feature_time", "lead_id"]].reset_index(drop=True)
    ordered = ordered.sort_values(["feature_time", "lead_id"], kind="mergesort")
    order = ordered.index.to_numpy()
    times = ordered["feature_time"].to_numpy(dtype="datetime64[ns]")

    target = min(max(1, round(holdout_fraction * n_rows)), n_rows - 1)
    boundary = times[n_rows - target]
    whole_time_sizes = [int((times > boundary).sum()), int((times >= boundary).sum())]
    candidates = [size for size in whole_time_sizes if 0 < size < n_rows]
    if candidates:
        n_holdout = min(candidates, key=lambda size: (abs(size - target), size))
    else:
        n_holdout = target

    return order[: n_rows - n_holdout], order[n_rows - n_holdout :]


def choose_calibration_method(n_fit_rows: int, folds: int) -> str:
    """Return 'isotonic' when each calibration fold is large enough, else 'sigmoid'."""
    return "isotonic" if n_fit_rows / folds >= MIN_ISOTONIC_ROWS_PER_FOLD else "sigmoid"


def build_conversion_pipeline(spec: FeatureSpec, method: str, folds: int, seed: int) -> Pipeline:
    """Build the unfitted encoder + calibrated gradient boosting classifier."""
    booster = HistGradientBoostingClassifier(
        **CONVERSION_BOOSTING_PARAMS,
        categorical_features=_categorical_mask(spec),
        random_state=seed,
    )
    # Shuffled folds: the fitting rows are in time order, and calibrating on one contiguous
    # period would fold a seasonal shift into the calibration map.
    calibrated = CalibratedClassifierCV(
        booster,
        method=method,
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
    )
    return Pipeline([("encode", build_encoder(spec)), ("classify", calibrated)])


class SmearedLogRegressor(RegressorMixin, BaseEstimator):
    """Fit a regressor on ln(y) and predict the mean of y with Duan's smearing factor.

    Ranking by a log-target model is robust to the heavy right tail of LTV. Back-transforming
    with exp alone would predict roughly the geometric mean, which is too low for
    p_convert x predicted_ltv, so predictions are multiplied by mean(exp(residual)) over the
    fitting rows. The factor assumes residuals of similar spread for every account.
    """

    def __init__(self, regressor: Any = None):
        self.regressor = regressor

    def fit(self, X, y):
        y = np.asarray(y, dtype=np.float64)
        if (y <= 0).any():
            raise ValueError("SmearedLogRegressor needs positive targets")
        self.regressor_ = clone(self.regressor).fit(X, np.log(y))
        residuals = np.log(y) - self.regressor_.predict(X)
        self.smearing_factor_ = float(np.mean(np.exp(residuals)))
        return self

    def predict(self, X):
        return np.exp(self.regressor_.predict(X)) * self.smearing_factor_


def build_value_pipeline(spec: FeatureSpec, seed: int) -> Pipeline:
    """Build the unfitted encoder + log-target gradient boosting regressor with smearing."""
    booster = HistGradientBoostingRegressor(
        **VALUE_BOOSTING_PARAMS,
        categorical_features=_categorical_mask(spec),
        random_state=seed,
    )
    return Pipeline(
        [("encode", build_encoder(spec)), ("regress", SmearedLogRegressor(booster))]
    )


def build_encoder(spec: FeatureSpec) -> ColumnTransformer:
    """Build the column encoder: categoricals to ordinal codes first, numeric columns unchanged.

    A category never seen in training is encoded as NaN, which the booster treats as missing.
    """
    transformers: list[tuple[str, Any, list[str]]] = []
    if spec.categorical:
        encoder = OrdinalEncoder(
            handle_unknown="use_encoded_value",
            unknown_value=np.nan,
            max_categories=MAX_CATEGORIES,
            dtype=np.float64,
        )
        transformers.append(("categorical", encoder, list(spec.categorical)))
    if spec.numeric:
        transformers.append(("numeric", "passthrough", list(spec.numeric)))
    return ColumnTransformer(transformers, remainder="drop")


def _categorical_mask(spec: FeatureSpec) -> list[bool] | None:
    if not spec.categorical:
        return None
    return [True] * len(spec.categorical) + [False] * len(spec.numeric)


def _require_columns(frame: pd.DataFrame, columns: list[str], frame_name: str) -> None:
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise MissingFeatureError(missing, frame_name)


def _binary_labels(label: pd.Series) -> np.ndarray:
    values = pd.to_numeric(label.astype(object), errors="coerce").astype(np.float64)
    invalid = ~values.isin([0.0, 1.0])
    if invalid.any():
        examples = label[invalid].head(3).tolist()
        raise ValueError(
            f"label must be 0 or 1 on every row; {int(invalid.sum())} rows have other or "
            f"missing values, such as {examples}"
        )
    return values.to_numpy().astype(np.int64)


def _check_class_counts(labels: np.ndarray, min_positives: int, where: str) -> None:
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives < min_positives:
        raise InsufficientDataError(
            f"{where} has {positives} positive and {negatives} negative rows; "
            f"model.min_training_positives is {min_positives}"
        )


def _check_fit_and_holdout_classes(
    labels: np.ndarray, fit_positions: np.ndarray, holdout_positions: np.ndarray, folds: int
) -> None:
    fit_positives = int(labels[fit_positions].sum())
    fit_negatives = len(fit_positions) - fit_positives
    if min(fit_positives, fit_negatives) < folds:
        raise InsufficientDataError(
            f"the fitting part (before the holdout) has {fit_positives} positive and "
            f"{fit_negatives} negative rows; model.calibration_folds is {folds} and each "
            f"class needs at least one row per fold"
        )

    holdout_positives = int(labels[holdout_positions].sum())
    holdout_negatives = len(holdout_positions) - holdout_positives
    if holdout_positives == 0 or holdout_negatives == 0:
        raise InsufficientDataError(
            f"the holdout (model.holdout_fraction = most recent rows) has {holdout_positives} "
            f"positive and {holdout_negatives} negative rows; ROC AUC needs both classes"
        )


def _holdout_frame(
    train_set: pd.DataFrame,
    holdout_features: pd.DataFrame,
    holdout_positions: np.ndarray,
    actual: np.ndarray,
    predicted: np.ndarray,
) -> pd.DataFrame:
    keys = train_set[["lead_id", "feature_time"]].iloc[holdout_positions].reset_index(drop=True)
    frame = pd.concat([keys, holdout_features.reset_index(drop=True)], axis=1)
    frame["actual"] = np.asarray(actual, dtype=np.float64)
    frame["predicted"] = np.asarray(predicted, dtype=np.float64)
    return frame


def _timestamp_text(value: Any) -> str:
    return pd.Timestamp(value).isoformat()


def evaluate_conversion(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Compute ranking and calibration metrics of conversion probabilities on a holdout."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return {
        "roc_auc": float(roc_auc_score(labels, probabilities)),
        "pr_auc": float(average_precision_score(labels, probabilities)),
        "brier": float(brier_score_loss(labels, probabilities)),
        "log_loss": float(log_loss(labels, probabilities, labels=[0, 1])),
        "lift_top_decile": top_decile_lift(labels, probabilities),
        "holdout_positive_rate": float(labels.mean()),
        "holdout_mean_probability": float(probabilities.mean()),
    }


def top_decile_lift(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the positive rate of the top 10% by score divided by the overall positive rate.

    The top decile is the ceil(10%) highest scores, ties broken by row order.
    """
    labels = np.asarray(labels, dtype=np.float64)
    base_rate = labels.mean()
    if base_rate == 0:
        return math.nan
    n_top = max(1, math.ceil(0.1 * len(labels)))
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n_top]
    return float(labels[top].mean() / base_rate)


def evaluate_value(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Compute rank and scale metrics of predicted LTVs on a holdout.

    ``mae_log_ltv`` is the mean absolute difference of log1p(LTV). ``mean_ratio`` is the mean
    prediction over the mean actual LTV, where 1.0 means no overall bias. Spearman is NaN when
    the predictions or the actual values are constant.
    """
    actual = np.asarray(actual, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if np.ptp(actual) == 0 or np.ptp(predicted) == 0:
        spearman = math.nan
    else:
        spearman = float(spearmanr(actual, predicted).statistic)
    return {
        "spearman": spearman,
        "mae_log_ltv": float(np.mean(np.abs(np.log1p(predicted) - np.log1p(actual)))),
        "mean_ratio": float(predicted.mean() / actual.mean()),
        "holdout_mean_ltv": float(actual.mean()),
    }


def plot_calibration_curve(labels: np.ndarray, probabilities: np.ndarray) -> bytes:
    """Render observed conversion rate against mean predicted probability, 10 quantile bins."""
    observed, predicted = calibration_curve(labels, probabilities, n_bins=10, strategy="quantile")

    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.plot(predicted, observed, marker="o", label="holdout")
    upper = max(float(np.max(predicted, initial=0)), float(np.max(observed, initial=0)), 0.05)
    axes.set_xlim(0, min(1.0, upper * 1.1))
    axes.set_ylim(0, min(1.0, upper * 1.1))
    axes.set_xlabel("mean predicted probability")
    axes.set_ylabel("observed conversion rate")
    axes.set_title("Conversion calibration on the holdout")
    axes.legend(loc="upper left")
    return render_png(figure)


def plot_value_deciles(actual: np.ndarray, predicted: np.ndarray) -> bytes:
    """Render mean predicted and mean actual LTV for each decile of the predicted LTV."""
    n_bins = min(10, len(predicted))
    ranks = pd.Series(predicted).rank(method="first")
    deciles = pd.qcut(ranks, n_bins, labels=False)
    table = pd.DataFrame({"decile": deciles + 1, "actual": actual, "predicted": predicted})
    means = table.groupby("decile")[["predicted", "actual"]].mean()

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(means.index, means["predicted"], marker="o", label="mean predicted LTV")
    axes.plot(means.index, means["actual"], marker="s", label="mean actual LTV")
    axes.set_xticks(list(means.index))
    axes.set_xlabel("decile of predicted LTV (1 = lowest)")
    axes.set_ylabel("LTV")
    axes.set_title("Value model on the holdout")
    axes.legend(loc="upper left")
    return render_png(figure)


def render_png(figure: Figure) -> bytes:
    """Render a matplotlib figure to PNG bytes with the Agg canvas, without pyplot state."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def log_and_register(
    trained: TrainedModel, settings: Settings, tags: dict[str, str], as_of: date
) -> RegistrationResult:
    """Log one MLflow run for the model, register it and decide whether it becomes champion.

    The current champion is re-scored on the new model's holdout. The new version takes the
    alias ``champion`` unless its primary metric (ROC AUC for conversion, Spearman for value)
    is below the champion's by more than ``model.promotion_tolerance``. A rejected version
    gets the tag ``rejected_reason``.
    """
    client = _connect(settings)
    experiment_id = _ensure_experiment(client, settings)
    model_name = model_name_for(settings, trained.kind)
    metric = trained.primary_metric

    champion = _load_champion(client, model_name, trained.kind)
    champion_metric, champion_error = _score_champion_on_holdout(champion, trained)
    run_tags = {**tags, "as_of": as_of.isoformat(), "model_kind": trained.kind}

    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"{trained.kind}-{as_of.isoformat()}", tags=run_tags
    ) as run:
        run_id = run.info.run_id
        counts = {"n_train": trained.n_train, "n_holdout": trained.n_holdout}
        mlflow.log_params({**trained.params, **counts})
        mlflow.log_metrics(trained.metrics)
        if champion_metric is not None:
            mlflow.log_metric(f"champion_{metric}_on_holdout", champion_metric)
        mlflow.log_dict(trained.spec.to_dict(), "feature_spec.json")
        _log_plots(trained.plots)
        model_info = _log_model(trained, model_name)
        new_version = str(model_info.registered_model_version)

        promoted, reason = decide_promotion(
            trained.kind,
            new_version,
            trained.metrics[metric],
            champion,
            champion_metric,
            champion_error,
            settings.model.promotion_tolerance,
        )
        mlflow.set_tags({"promoted": str(promoted).lower(), "promotion_reason": reason})

    for key, value in run_tags.items():
        client.set_model_version_tag(model_name, new_version, key, value)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, new_version)
        promoted_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        client.set_model_version_tag(model_name, new_version, CHAMPION_FROM_TAG, promoted_at)
        champion_version = new_version
    else:
        client.set_model_version_tag(model_name, new_version, "rejected_reason", reason)
        champion_version = champion.version if champion is not None else None

    logger.info("%s model %s version %s: %s", trained.kind, model_name, new_version, reason)
    return RegistrationResult(
        kind=trained.kind,
        model_name=model_name,
        new_version=new_version,
        champion_version=champion_version,
        promoted=promoted,
        reason=reason,
        run_id=run_id,
        metrics=dict(trained.metrics),
    )


def decide_promotion(
    kind: ModelKind,
    new_version: str,
    new_metric: float,
    champion: ChampionModel | None,
    champion_metric: float | None,
    champion_error: str | None,
    tolerance: float,
) -> tuple[bool, str]:
    """Return whether the new version becomes champion, and the reason in one sentence."""
    label = PRIMARY_METRIC_LABEL[kind]
    if champion is None:
        return True, f"version {new_version} is the first champion (no champion existed)"
    if champion_error is not None:
        return True, (
            f"champion version {champion.version} could not score the new holdout "
            f"({champion_error}); version {new_version} replaces it"
        )
    if math.isnan(new_metric):
        return False, (
            f"version {new_version} has an undefined holdout {label}; "
            f"champion version {champion.version} stays"
        )
    if champion_metric is None or math.isnan(champion_metric):
        return True, (
            f"version {new_version} promoted: holdout {label} {new_metric:.4f}, and champion "
            f"version {champion.version}'s {label} on the same holdout is undefined"
        )

    comparison = (
        f"holdout {label} {new_metric:.4f} against champion version {champion.version}'s "
        f"{champion_metric:.4f} on the same holdout, tolerance {tolerance:g}"
    )
    if new_metric >= champion_metric - tolerance:
        return True, f"version {new_version} promoted: {comparison}"
    return False, (
        f"version {new_version} rejected, champion version {champion.version} stays: {comparison}"
    )


def load_champion(settings: Settings, kind: ModelKind) -> ChampionModel | None:
    """Load the version with the ``champion`` alias, or return None when there is none yet."""
    client = _connect(settings)
    return _load_champion(client, model_name_for(settings, kind), kind)


def champion_version(settings: Settings, kind: ModelKind) -> str | None:
    """Return the version number with the ``champion`` alias, without loading the model."""
    client = _connect(settings)
    return _champion_version(client, model_name_for(settings, kind))


def load_model_version(settings: Settings, kind: ModelKind, version: str) -> ChampionModel:
    """Load one registered version of the ``kind`` model for scoring."""
    _connect(settings)
    return _load_version(model_name_for(settings, kind), kind, version)


def champion_version_as_of(settings: Settings, kind: ModelKind, as_of: date) -> str | None:
    """Return the version that was champion for the data date ``as_of``, or None if unrecorded.

    That is the version with the newest ``as_of`` tag not after ``as_of``, among the versions
    that took the champion alias (tag ``champion_from``), and the latest promoted one on a
    tie. Such a version was trained only on data known at ``as_of``. Versions promoted before
    this tag was introduced carry no ``champion_from`` and are not considered.
    """
    client = _connect(settings)
    model_name = model_name_for(settings, kind)
    if "'" in model_name:
        raise ValueError(
            f"registered model name {model_name!r} contains a single quote, which an MLflow "
            f"search filter cannot hold; rename the model in the settings"
        )

    candidates = []
    page_token = None
    while True:
        page = client.search_model_versions(f"name = '{model_name}'", page_token=page_token)
        for model_version in page:
            tags = model_version.tags or {}
            promoted_at = tags.get(CHAMPION_FROM_TAG)
            trained_as_of = tags.get("as_of")
            if promoted_at and trained_as_of and date.fromisoformat(trained_as_of) <= as_of:
                candidates.append((trained_as_of, promoted_at, int(model_version.version)))
        page_token = page.token
        if not page_token:
            break

    if not candidates:
        return None
    return str(max(candidates)[2])


def model_name_for(settings: Settings, kind: ModelKind) -> str:
    """Return the registered model name for ``kind`` from the settings."""
    if kind == "conversion":
        return settings.conversion_model_name
    if kind == "value":
        return settings.value_model_name
    raise ValueError(f"model kind must be 'conversion' or 'value'. Got {kind!r}.")


def _connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the run's tracking store and return a client for it.

    The URI may contain a password, so this module passes it only to MLflow and never logs it.
    """
    uri = settings.mlflow_tracking_uri.get_secret_value()
    # MLflow prints a run URL built from an HTTP tracking URI, which could carry credentials.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return client.create_experiment(
            settings.experiment_name,
            artifact_location=_artifact_uri(settings.mlflow_artifact_location),
        )
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {settings.experiment_name!r} is deleted; restore it with "
            f"`mlflow experiments restore` or set experiment_name to another name"
        )
    return experiment.experiment_id


def _artifact_uri(location: str) -> str:
    # A relative path is made absolute in the worker's directory. An MLflow tracking server
    # would otherwise resolve it against its own working directory.
    if "://" in location or location.startswith("file:"):
        return location
    return Path(location).resolve().as_uri()


def _log_plots(plots: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, png in plots.items():
            path = Path(folder) / name
            path.write_bytes(png)
            mlflow.log_artifact(str(path), artifact_path="plots")


def _log_model(trained: TrainedModel, model_name: str) -> Any:
    example = trained.holdout_predictions[trained.spec.input_columns].head(5).reset_index(drop=True)
    example = prepare_model_input(example, trained.spec)
    predict_method = "predict_proba" if trained.kind == "conversion" else "predict"
    signature = infer_signature(example, getattr(trained.pipeline, predict_method)(example))
    return mlflow.sklearn.log_model(
        trained.pipeline,
        name="model",
        signature=signature,
        input_example=example,
        registered_model_name=model_name,
        pyfunc_predict_fn=predict_method,
        skops_trusted_types=SKOPS_TRUSTED_TYPES,
        metadata={"fulcrum_kind": trained.kind, "feature_spec": trained.spec.to_dict()},
        # Listed requirements skip MLflow's inference, which imports the model in a subprocess.
        pip_requirements=_pip_requirements(),
    )


def _pip_requirements() -> list[str]:
    requirements = []
    for package in ("mlflow", "scikit-learn", "skops", "numpy", "pandas", "scipy"):
        try:
            requirements.append(f"{package}=={package_version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def _champion_version(client: MlflowClient, model_name: str) -> str | None:
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = registered.aliases.get(CHAMPION_ALIAS)
    return None if version is None else str(version)


def _load_champion(client: MlflowClient, model_name: str, kind: ModelKind) -> ChampionModel | None:
    version = _champion_version(client, model_name)
    if version is None:
        return None

    # Loading by version number, not by alias, so a promotion that lands in between cannot
    # pair one version's number with another version's weights.
    return _load_version(model_name, kind, version)


def _load_version(model_name: str, kind: ModelKind, version: str) -> ChampionModel:
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    metadata = model.metadata.metadata or {}
    if "feature_spec" not in metadata:
        raise ValueError(
            f"{model_name} version {version} has no feature_spec in its MLmodel metadata; "
            f"it was not logged by tasks/train.py. Move the champion alias to a version that was"
        )
    return ChampionModel(
        kind=kind,
        model_name=model_name,
        version=version,
        spec=FeatureSpec.from_dict(metadata["feature_spec"]),
        predict_fn=_pyfunc_output_function(kind, model),
        run_id=model.metadata.run_id,
    )


def _pyfunc_output_function(kind: ModelKind, model: mlflow.pyfunc.PyFuncModel) -> Callable:
    # The pyfunc wrapper enforces the logged signature before calling the pipeline.
    if kind == "conversion":
        return lambda prepared: np.asarray(model.predict(prepared))[:, 1]
    return lambda prepared: np.asarray(model.predict(prepared))


def _model_output_function(kind: ModelKind, pipeline: Pipeline) -> Callable:
    if kind == "conversion":
        return lambda prepared: pipeline.predict_proba(prepared)[:, 1]
    return pipeline.predict


def _score_champion_on_holdout(
    champion: ChampionModel | None, trained: TrainedModel
) -> tuple[float | None, str | None]:
    """Return the champion's primary metric on the new holdout, or the reason it cannot score."""
    if champion is None:
        return None, None
    holdout = trained.holdout_predictions
    try:
        predicted = champion.predict(holdout)
    except MissingFeatureError as exc:
        return None, f"it needs columns {exc.missing} that the new features lack"

    actual = holdout["actual"].to_numpy()
    if trained.kind == "conversion":
        return evaluate_conversion(actual, predicted)["roc_auc"], None
    return evaluate_value(actual, predicted)["spearman"], None


@task(name="train-conversion-model", cache_policy=NO_CACHE)
@measured
def train_conversion_task(
    train_set: pd.DataFrame,
    spec: FeatureSpec,
    settings: Settings,
    tags: dict[str, str],
    as_of: date,
) -> RegistrationResult:
    """Train, log and register the conversion model, or keep the champion when data is short."""
    return _train_and_register(
        "conversion", train_conversion_model, train_set, spec, settings, tags, as_of
    )


@task(name="train-value-model", cache_policy=NO_CACHE)
@measured
def train_value_task(
    train_set: pd.DataFrame,
    spec: FeatureSpec,
    settings: Settings,
    tags: dict[str, str],
    as_of: date,
) -> RegistrationResult:
    """Train, log and register the value model, or keep the champion when data is short."""
    return _train_and_register("value", train_value_model, train_set, spec, settings, tags, as_of)


def _train_and_register(
    kind: ModelKind,
    train: Callable[[pd.DataFrame, FeatureSpec, Settings], TrainedModel],
    train_set: pd.DataFrame,
    spec: FeatureSpec,
    settings: Settings,
    tags: dict[str, str],
    as_of: date,
) -> RegistrationResult:
    run_logger = _run_logger()
    try:
        trained = train(train_set, spec, settings)
    except InsufficientDataError as exc:
        current = champion_version(settings, kind)
        keeps = f"champion version {current} keeps scoring" if current else "no champion exists yet"
        run_logger.warning("%s model not retrained: %s; %s", kind, exc, keeps)
        return RegistrationResult(
            kind=kind,
            model_name=model_name_for(settings, kind),
            new_version=None,
            champion_version=current,
            promoted=False,
            reason=f"not retrained: {exc}",
            run_id=None,
        )

    result = log_and_register(trained, settings, tags, as_of)
    run_logger.info(
        "%s model version %s trained on %d rows, evaluated on %d: %s; %s",
        kind,
        result.new_version,
        trained.n_train,
        trained.n_holdout,
        _headline_metrics(trained),
        result.reason,
    )
    return result


def _headline_metrics(trained: TrainedModel) -> str:
    names = (
        ("roc_auc", "pr_auc", "brier", "lift_top_decile")
        if trained.kind == "conversion"
        else ("spearman", "mae_log_ltv", "mean_ratio")
    )
    return ", ".join(f"{name} {trained.metrics[name]:.3f}" for name in names)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    # Outside a flow run (tests calling `.fn`, notebooks) the module logger takes over.
    try:
        return get_run_logger()
    except MissingContextError:
        return logger
