"""Tests for tasks/train.py: input casting, holdout, both models and the MLflow registry."""

from __future__ import annotations

import logging
import math
from datetime import date

import numpy as np
import pandas as pd
import pytest
import skops.io
from mlflow import MlflowClient
from threadpoolctl import threadpool_limits

from fulcrum.settings import Settings
from tasks.train import (
    MISSING_CATEGORY,
    SKOPS_TRUSTED_TYPES,
    ChampionModel,
    FeatureSpec,
    InsufficientDataError,
    MissingFeatureError,
    build_conversion_pipeline,
    choose_calibration_method,
    decide_promotion,
    load_champion,
    log_and_register,
    prepare_model_input,
    split_by_time,
    top_decile_lift,
    train_conversion_model,
    train_conversion_task,
    train_value_model,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPEC = FeatureSpec(numeric=["employees", "page_views", "has_demo"], categorical=["channel"])
SNAPSHOT_TIMES = pd.date_range("2024-01-01", periods=5, freq="30D", tz="UTC")


def make_conversion_set(rows_per_snapshot: int = 300, seed: int = 0) -> pd.DataFrame:
    """Five monthly snapshots of leads whose label depends on page views, demo and channel."""
    rng = np.random.default_rng(seed)
    n_rows = rows_per_snapshot * len(SNAPSHOT_TIMES)
    employees = rng.lognormal(4, 1, n_rows)
    employees[rng.random(n_rows) < 0.1] = np.nan
    page_views = rng.poisson(3, n_rows).astype(np.float64)
    has_demo = (rng.random(n_rows) < 0.3).astype(np.float64)
    channel = rng.choice(np.array(["organic", "referral", "paid", None], dtype=object), n_rows)
    logit = -2.5 + 0.35 * page_views + 1.2 * has_demo + 0.8 * (channel == "referral")
    label = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pd.DataFrame(
        {
            "lead_id": [f"L{index:05d}" for index in range(n_rows)],
            "feature_time": np.repeat(SNAPSHOT_TIMES, rows_per_snapshot),
            "employees": employees,
            "page_views": page_views,
            "has_demo": has_demo,
            "channel": pd.Series(channel, dtype=object),
            "label": label,
        }
    )


def make_value_set(rows_per_snapshot: int = 60, seed: int = 1) -> pd.DataFrame:
    """Converted leads whose LTV grows with company size and is larger for referrals."""
    rng = np.random.default_rng(seed)
    n_rows = rows_per_snapshot * len(SNAPSHOT_TIMES)
    employees = rng.lognormal(4, 1, n_rows)
    channel = rng.choice(np.array(["organic", "referral", "paid"], dtype=object), n_rows)
    mean_ltv = np.exp(6 + 0.6 * np.log(employees) + 0.5 * (channel == "referral"))
    ltv = rng.gamma(shape=4.0, scale=mean_ltv / 4.0)
    return pd.DataFrame(
        {
            "lead_id": [f"V{index:05d}" for index in range(n_rows)],
            "feature_time": np.repeat(SNAPSHOT_TIMES, rows_per_snapshot),
            "employees": employees,
            "page_views": rng.poisson(3, n_rows).astype(np.float64),
            "has_demo": (rng.random(n_rows) < 0.5).astype(np.float64),
            "channel": pd.Series(channel, dtype=object),
            "ltv": ltv,
        }
    )


@pytest.fixture(scope="module", autouse=True)
def single_openmp_thread():
    """Fit the boosters on one OpenMP thread.

    On a busy test machine, waiting OpenMP threads spin and a one-second fit takes 20 times
    as long.
    """
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory):
    """Settings for module-scoped fixtures, resolved away from any fulcrum.toml."""
    folder = tmp_path_factory.mktemp("settings")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("FULCRUM_CONFIG", raising=False)
        settings = Settings(
            mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            mlflow_artifact_location=str(folder / "mlartifacts"),
            experiment_name="fulcrum-test",
        )
    return settings


@pytest.fixture(scope="module")
def conversion_set() -> pd.DataFrame:
    return make_conversion_set()


@pytest.fixture(scope="module")
def trained_conversion(conversion_set, module_settings):
    return train_conversion_model(conversion_set, SPEC, module_settings)


# prepare_model_input


def test_prepare_casts_nullable_int_and_boolean():
    frame = pd.DataFrame(
        {
            "lead_id": ["a", "b", "c"],
            "channel": ["organic", None, np.nan],
            "has_demo": pd.array([True, pd.NA, False], dtype="boolean"),
            "employees": pd.array([10, pd.NA, 30], dtype="Int64"),
            "page_views": [1.0, np.nan, np.inf],
        }
    )

    prepared = prepare_model_input(frame, SPEC)

    assert list(prepared.columns) == ["employees", "page_views", "has_demo", "channel"]
    assert prepared["employees"].dtype == np.float64
    assert prepared["has_demo"].dtype == np.float64
    np.testing.assert_array_equal(prepared["employees"], [10.0, np.nan, 30.0])
    np.testing.assert_array_equal(prepared["has_demo"], [1.0, np.nan, 0.0])
    np.testing.assert_array_equal(prepared["page_views"], [1.0, np.nan, np.nan])
    assert prepared["channel"].dtype == object
    assert prepared["channel"].tolist() == ["organic", MISSING_CATEGORY, MISSING_CATEGORY]


def test_prepare_casts_string_and_object_columns():
    frame = pd.DataFrame(
        {
            "channel": pd.array(["paid", None], dtype="string"),
            "has_demo": pd.Series([True, None], dtype=object),
            "employees": pd.Series([5, None], dtype=object),
            "page_views": [2.0, 3.0],
        }
    )

    prepared = prepare_model_input(frame, SPEC)

    assert prepared["channel"].tolist() == ["paid", MISSING_CATEGORY]
    assert prepared["channel"].dtype == object
    np.testing.assert_array_equal(prepared["has_demo"], [1.0, np.nan])
    np.testing.assert_array_equal(prepared["employees"], [5.0, np.nan])


def test_prepare_missing_column_names_it():
    frame = pd.DataFrame({"channel": ["paid"], "page_views": [1.0]})

    with pytest.raises(MissingFeatureError, match=r"\['employees', 'has_demo'\]") as caught:
        prepare_model_input(frame, SPEC)

    assert isinstance(caught.value, ValueError)
    assert caught.value.missing == ["employees", "has_demo"]


def test_prepare_text_in_numeric_column_raises():
    frame = pd.DataFrame(
        {"channel": ["paid"], "page_views": [1.0], "has_demo": [0.0], "employees": ["many"]}
    )

    message = "numeric feature 'employees' has non-numeric values such as 'many'"
    with pytest.raises(ValueError, match=message):
        prepare_model_input(frame, SPEC)


def test_feature_spec_rejects_bad_columns():
    with pytest.raises(ValueError, match=r"lists \['channel'\] more than once"):
        FeatureSpec(numeric=["channel"], categorical=["channel"])
    with pytest.raises(ValueError, match=r"must not use \['label'\]"):
        FeatureSpec(numeric=["label"], categorical=[])


# Holdout and helpers


def test_split_holds_out_whole_latest_snapshot():
    frame = pd.DataFrame(
        {
            "lead_id": [f"L{index}" for index in range(60)],
            "feature_time": np.repeat(
                pd.date_range("2024-01-01", periods=6, freq="30D", tz="UTC"), 10
            ),
        }
    )

    fit_positions, holdout_positions = split_by_time(frame, 0.2)

    # The target is 12 rows, and the last snapshot (10 rows) is closer to it than the last two (20).
    assert sorted(holdout_positions) == list(range(50, 60))
    assert sorted(fit_positions) == list(range(50))


def test_split_by_position_when_one_feature_time():
    frame = pd.DataFrame(
        {"lead_id": ["e", "a", "d", "b", "c"], "feature_time": pd.Timestamp("2024-01-01", tz="UTC")}
    )

    fit_positions, holdout_positions = split_by_time(frame, 0.4)

    assert frame["lead_id"].iloc[holdout_positions].tolist() == ["d", "e"]
    assert frame["lead_id"].iloc[fit_positions].tolist() == ["a", "b", "c"]


def test_calibration_method_by_fold_size():
    assert choose_calibration_method(3000, 3) == "isotonic"
    assert choose_calibration_method(2999, 3) == "sigmoid"


def test_isotonic_pipeline_loads_with_trusted_types(conversion_set):
    fit_rows = conversion_set.head(600)
    pipeline = build_conversion_pipeline(SPEC, "isotonic", 3, seed=0)
    pipeline.fit(prepare_model_input(fit_rows, SPEC), fit_rows["label"])

    loaded = skops.io.loads(skops.io.dumps(pipeline), trusted=SKOPS_TRUSTED_TYPES)

    prepared = prepare_model_input(fit_rows.head(5), SPEC)
    np.testing.assert_allclose(loaded.predict_proba(prepared), pipeline.predict_proba(prepared))


def test_top_decile_lift_exact():
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    scores = np.linspace(1.0, 0.1, 10)

    # The top decile is the first row, a positive: rate 1.0 over a base rate of 0.2.
    assert top_decile_lift(labels, scores) == pytest.approx(5.0)


# Conversion model


def test_conversion_metrics_in_sane_ranges(trained_conversion, conversion_set):
    metrics = trained_conversion.metrics

    assert 0.65 < metrics["roc_auc"] < 0.95
    assert metrics["pr_auc"] > metrics["holdout_positive_rate"]
    base_rate = metrics["holdout_positive_rate"]
    assert metrics["brier"] < base_rate * (1 - base_rate)
    assert 0 < metrics["log_loss"] < 0.7
    assert metrics["lift_top_decile"] > 1.5
    assert trained_conversion.n_train == 1200
    assert trained_conversion.n_holdout == 300
    assert trained_conversion.params["calibration_method"] == "sigmoid"
    assert trained_conversion.plots["calibration_curve.png"].startswith(PNG_SIGNATURE)


def test_conversion_holdout_is_latest_snapshot(trained_conversion):
    holdout = trained_conversion.holdout_predictions

    assert (holdout["feature_time"] == SNAPSHOT_TIMES[-1]).all()
    expected_columns = ["lead_id", "feature_time", *SPEC.input_columns, "actual", "predicted"]
    assert list(holdout.columns) == expected_columns
    assert holdout["predicted"].between(0, 1).all()


def test_conversion_scores_unseen_category(trained_conversion, conversion_set):
    leads = conversion_set.head(3).drop(columns="label").copy()
    leads["channel"] = ["trade_show", None, "organic"]

    probabilities = trained_conversion.predict(leads)

    assert probabilities.shape == (3,)
    assert np.isfinite(probabilities).all()


def test_too_few_positives_raises(conversion_set, settings_factory):
    settings = settings_factory(model={"min_training_positives": 10_000})

    positives = int(conversion_set["label"].sum())
    message = f"{positives} positive.*min_training_positives is 10000"
    with pytest.raises(InsufficientDataError, match=message):
        train_conversion_model(conversion_set, SPEC, settings)


def test_fewer_positives_than_folds_raises(conversion_set, settings_factory):
    train_set = conversion_set.copy()
    train_set["label"] = 0
    train_set.loc[train_set.index[:2], "label"] = 1
    train_set.loc[train_set.index[-10:], "label"] = 1
    settings = settings_factory(model={"min_training_positives": 5, "calibration_folds": 3})

    with pytest.raises(InsufficientDataError, match="has 2 positive.*calibration_folds is 3"):
        train_conversion_model(train_set, SPEC, settings)


def test_non_binary_label_raises(conversion_set, settings_factory):
    train_set = conversion_set.copy()
    train_set.loc[0, "label"] = 2

    with pytest.raises(ValueError, match="label must be 0 or 1"):
        train_conversion_model(train_set, SPEC, settings_factory())


# Value model


def test_value_metrics_in_sane_ranges(settings_factory):
    trained = train_value_model(make_value_set(), SPEC, settings_factory())

    assert trained.metrics["spearman"] > 0.5
    assert 0 < trained.metrics["mae_log_ltv"] < 1.0
    assert 0.5 < trained.metrics["mean_ratio"] < 2.0
    assert (trained.holdout_predictions["predicted"] > 0).all()
    assert trained.plots["decile_plot.png"].startswith(PNG_SIGNATURE)


def test_value_drops_non_positive_ltv(caplog, settings_factory):
    train_set = make_value_set()
    train_set.loc[[0, 1], "ltv"] = [0.0, -5.0]

    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        trained = train_value_model(train_set, SPEC, settings_factory())

    assert trained.n_train + trained.n_holdout == len(train_set) - 2
    assert trained.params["rows_dropped_nonpositive_ltv"] == 2
    assert "2 rows with a missing, infinite or non-positive ltv" in caplog.text


def test_empty_numeric_input_left_out(caplog, settings_factory):
    train_set = make_value_set()
    train_set["employees"] = np.nan

    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        trained = train_value_model(train_set, SPEC, settings_factory())

    assert trained.spec.numeric == ["page_views", "has_demo"]
    assert trained.spec.categorical == ["channel"]
    assert trained.params["n_numeric"] == 2
    assert "left out numeric inputs with no value on the fitting rows: ['employees']" in caplog.text


def test_only_empty_inputs_raise(settings_factory):
    train_set = make_value_set().assign(employees=np.nan)
    spec = FeatureSpec(numeric=["employees"], categorical=[])

    with pytest.raises(InsufficientDataError, match="every model input is empty"):
        train_value_model(train_set, spec, settings_factory())


def test_value_too_few_rows_raises(settings_factory):
    train_set = make_value_set(rows_per_snapshot=5)

    with pytest.raises(InsufficientDataError, match="has 25 rows.*min_value_training_rows is 30"):
        train_value_model(train_set, SPEC, settings_factory())


# Promotion rule


@pytest.mark.parametrize(
    ("new_metric", "champion_metric", "promoted"),
    [
        (0.800, 0.800, True),
        (0.796, 0.800, True),  # within the 0.005 tolerance
        (0.794, 0.800, False),
        (0.700, math.nan, True),
        (math.nan, 0.800, False),
    ],
)
def test_promotion_rule(new_metric, champion_metric, promoted, trained_conversion):
    champion = ChampionModel.from_trained(trained_conversion, "fulcrum-conversion", "4")

    decision, reason = decide_promotion(
        "conversion", "5", new_metric, champion, champion_metric, None, 0.005
    )

    assert decision is promoted
    assert "champion version 4" in reason


# MLflow registry


@pytest.fixture(scope="module")
def registry(module_settings, conversion_set, trained_conversion):
    """A SQLite MLflow store with a good first model and a worse second one registered."""
    settings = module_settings
    first = log_and_register(
        trained_conversion, settings, {"flow_run_id": "run-1"}, date(2024, 6, 1)
    )

    # Shuffled labels before the holdout: the model learns noise, but is judged on real labels.
    noisy_set = conversion_set.copy()
    before_holdout = noisy_set["feature_time"] < SNAPSHOT_TIMES[-1]
    older_labels = noisy_set.loc[before_holdout, "label"].to_numpy()
    noisy_set.loc[before_holdout, "label"] = np.random.default_rng(7).permutation(older_labels)
    worse = train_conversion_model(noisy_set, SPEC, settings)
    second = log_and_register(worse, settings, {"flow_run_id": "run-2"}, date(2024, 6, 2))

    return {"settings": settings, "first": first, "second": second}


def test_first_version_becomes_champion(registry):
    first = registry["first"]

    assert first.new_version == "1"
    assert first.promoted is True
    assert first.champion_version == "1"
    assert "first champion" in first.reason


def test_worse_model_keeps_champion(registry):
    second = registry["second"]
    client = MlflowClient(tracking_uri=registry["settings"].mlflow_tracking_uri.get_secret_value())

    assert second.new_version == "2"
    assert second.promoted is False
    assert second.champion_version == "1"
    assert "rejected, champion version 1 stays" in second.reason
    rejected = client.get_model_version("fulcrum-conversion", "2")
    assert rejected.tags["rejected_reason"] == second.reason
    assert str(client.get_model_version_by_alias("fulcrum-conversion", "champion").version) == "1"


def test_run_records_tags_metrics_plots(registry):
    settings = registry["settings"]
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri.get_secret_value())

    run = client.get_run(registry["first"].run_id)

    assert run.data.tags["flow_run_id"] == "run-1"
    assert run.data.tags["as_of"] == "2024-06-01"
    assert run.data.metrics["roc_auc"] == pytest.approx(registry["first"].metrics["roc_auc"])
    assert not any("sqlite" in str(value) for value in run.data.params.values())
    assert not any("sqlite" in str(value) for value in run.data.tags.values())
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id, "plots")]
    assert artifacts == ["plots/calibration_curve.png"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.endswith("mlartifacts")


def test_load_champion_returns_first_version(registry, trained_conversion, conversion_set):
    champion = load_champion(registry["settings"], "conversion")

    assert champion is not None
    assert champion.version == "1"
    assert champion.spec == SPEC
    leads = conversion_set.head(20)
    np.testing.assert_allclose(champion.predict(leads), trained_conversion.predict(leads))


def test_champion_accepts_nulls_at_scoring(registry):
    champion = load_champion(registry["settings"], "conversion")
    leads = pd.DataFrame(
        {
            "lead_id": ["a", "b", "c"],
            "employees": pd.array([12, pd.NA, 40], dtype="Int64"),
            "page_views": [3.0, np.nan, 1.0],
            "has_demo": pd.array([pd.NA, True, False], dtype="boolean"),
            "channel": [None, "webinar", "paid"],
        }
    )

    probabilities = champion.predict(leads)

    assert probabilities.shape == (3,)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_load_champion_without_model_is_none(registry):
    settings = registry["settings"].model_copy(update={"value_model_name": "never-registered"})

    assert load_champion(settings, "value") is None


def test_value_model_becomes_first_champion(registry):
    trained = train_value_model(make_value_set(), SPEC, registry["settings"])

    result = log_and_register(
        trained, registry["settings"], {"flow_run_id": "run-3"}, date(2024, 6, 3)
    )
    champion = load_champion(registry["settings"], "value")

    assert result.promoted is True
    assert champion.version == result.new_version == "1"
    assert (champion.predict(make_value_set().head(5)) > 0).all()


def test_task_short_of_data_keeps_champion(registry, conversion_set, caplog):
    strict_model = registry["settings"].model.model_copy(update={"min_training_positives": 10_000})
    settings = registry["settings"].model_copy(update={"model": strict_model})

    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        result = train_conversion_task.fn(
            conversion_set, SPEC, settings, {"flow_run_id": "run-4"}, date(2024, 6, 4)
        )

    assert result.new_version is None
    assert result.promoted is False
    assert result.champion_version == "1"
    assert "min_training_positives is 10000" in result.reason
    assert "champion version 1 keeps scoring" in caplog.text
