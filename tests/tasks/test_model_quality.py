"""Both models measured against the simulator's ground truth on a time-based holdout.

The oracle is given each simulated lead's latent conversion probability and expected LTV. A
model that reads only what a CRM and a billing system record should come close to it.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from fulcrum.simulate import oracle_conversion_probability, simulate_company
from tasks.extract import as_of_cutoff, extract_sources
from tasks.features import build_conversion_training_set, build_value_training_set
from tasks.labels import label_accounts
from tasks.train import FeatureSpec, train_conversion_model, train_value_model

pytestmark = pytest.mark.slow

AS_OF = dt.date(2026, 7, 1)
LEADS = 40_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train both models once on a simulated company; return them with the truth table."""
    folder = tmp_path_factory.mktemp("quality")
    url = f"sqlite:///{folder / 'warehouse.db'}"
    simulate_company(url, leads=LEADS, months=24, seed=11, end=AS_OF - dt.timedelta(days=1))
    from fulcrum.settings import Settings

    settings = Settings(warehouse_url=url, var_dir=folder / "var")
    frames = extract_sources(settings, AS_OF)
    cutoff = as_of_cutoff(AS_OF, settings.business_timezone)
    account_ltv = label_accounts(frames.billing_accounts, frames.invoices, cutoff, settings.ltv)
    conversion_set = build_conversion_training_set(frames, cutoff, settings)
    value_set = build_value_training_set(frames, account_ltv, settings)

    conversion = train_conversion_model(
        conversion_set.frame, FeatureSpec(conversion_set.numeric, conversion_set.categorical), settings
    )
    value = train_value_model(value_set.frame, FeatureSpec(value_set.numeric, value_set.categorical), settings)
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        truth = pd.read_sql_query(sa.text("SELECT * FROM simulation_truth"), connection)
    engine.dispose()
    return {
        "conversion": conversion,
        "value": value,
        "truth": truth.set_index("lead_id"),
        "leads": frames.leads.set_index("lead_id"),
        "horizon_days": settings.horizon_days,
    }


def conversion_auc_against_oracle(trained) -> tuple[float, float]:
    holdout = trained["conversion"].holdout_predictions
    truth = trained["truth"].loc[holdout["lead_id"]].reset_index()
    created = trained["leads"].loc[holdout["lead_id"], "created_at"].to_numpy()
    age_days = (holdout["feature_time"].to_numpy() - created) / np.timedelta64(1, "D")
    oracle = oracle_conversion_probability(truth, age_days.astype(float), trained["horizon_days"])
    actual = holdout["actual"].to_numpy()
    return roc_auc_score(actual, holdout["predicted"]), roc_auc_score(actual, oracle)


def value_spearman_against_oracle(trained) -> tuple[float, float]:
    holdout = trained["value"].holdout_predictions
    oracle = trained["truth"].loc[holdout["lead_id"], "expected_ltv"].to_numpy()
    actual = holdout["actual"].to_numpy()
    return spearmanr(holdout["predicted"], actual).statistic, spearmanr(oracle, actual).statistic


def test_conversion_auc_close_to_oracle(trained):
    model_auc, oracle_auc = conversion_auc_against_oracle(trained)

    print(f"conversion ROC AUC: model {model_auc:.4f}, oracle {oracle_auc:.4f}")
    assert model_auc >= 0.95 * oracle_auc


def test_value_spearman_close_to_oracle(trained):
    model_rho, oracle_rho = value_spearman_against_oracle(trained)

    print(f"value Spearman: model {model_rho:.4f}, oracle {oracle_rho:.4f}")
    assert model_rho >= 0.90 * oracle_rho


def test_conversion_probabilities_are_calibrated(trained):
    holdout = trained["conversion"].holdout_predictions

    mean_predicted = holdout["predicted"].mean()
    observed = holdout["actual"].mean()

    assert mean_predicted == pytest.approx(observed, rel=0.35)
