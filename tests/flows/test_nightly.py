"""The nightly-scores flow end to end on a small simulated company."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from flows.nightly import StageError, nightly_scores, resolve_as_of
from fulcrum.settings import load_settings
from tests.flows.conftest import AS_OF

pytestmark = pytest.mark.slow


def read(sql: str, **params) -> pd.DataFrame:
    engine = sa.create_engine(load_settings().warehouse_url.get_secret_value())
    with engine.connect() as connection:
        frame = pd.read_sql_query(sa.text(sql), connection, params=params)
    engine.dispose()
    return frame


def expected_open_leads(cutoff: str) -> set[str]:
    """Open leads computed straight from the source tables, independently of the pipeline."""
    frame = read(
        """
        SELECT l.lead_id FROM leads l
        WHERE l.created_at < :cutoff
          AND (l.disqualified_at IS NULL OR l.disqualified_at >= :cutoff)
          AND NOT EXISTS (
              SELECT 1 FROM opportunities o
              WHERE o.lead_id = l.lead_id AND o.won = 1 AND o.closed_at < :cutoff)
        """,
        cutoff=cutoff,
    )
    return set(frame["lead_id"])


def test_nightly_run_writes_every_output_table(flow_env):
    result = nightly_scores(as_of=AS_OF)

    assert result.status == "succeeded"
    cutoff = f"{AS_OF} 00:00:00"
    scores = read("SELECT * FROM lead_scores")
    assert set(scores["lead_id"]) == expected_open_leads(cutoff)
    assert len(scores) == result.leads_scored
    assert scores["as_of"].astype(str).unique().tolist() == [AS_OF.isoformat()]
    assert scores["p_convert"].between(0, 1).all()
    assert (scores["predicted_ltv"] > 0).all()
    np.testing.assert_allclose(scores["expected_value"], scores["p_convert"] * scores["predicted_ltv"])
    for rank in ("rank_volume", "rank_value", "rank_expected_value", "rank_overlay"):
        assert sorted(scores[rank]) == list(range(1, len(scores) + 1)), rank
    by_p = scores.sort_values("rank_volume")["p_convert"].to_numpy()
    assert (np.diff(by_p) <= 0).all()
    assert set(scores["route"]) <= {"priority", "sales_rep", "self_serve", "nurture"}
    assert scores["run_id"].unique().tolist() == [result.run_id]

    accounts = read("SELECT * FROM account_ltv")
    started = read("SELECT COUNT(*) AS n FROM billing_accounts WHERE started_at < :c", c=cutoff)
    assert len(accounts) == int(started["n"].iloc[0])
    assert accounts["account_id"].is_unique

    frontier = read("SELECT * FROM volume_value_frontier ORDER BY overlay_weight")
    assert frontier["overlay_weight"].round(1).tolist() == [round(0.1 * i, 1) for i in range(11)]
    assert (frontier["capacity"] == 100).all()
    assert frontier["expected_conversions"].iloc[0] == pytest.approx(frontier["expected_conversions"].max())
    # Ranking by p x v picks the top leads by expected value, so w = 0.5 maximises it.
    assert frontier["expected_value"].iloc[5] == pytest.approx(frontier["expected_value"].max())

    runs = read("SELECT * FROM score_runs")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "succeeded"
    assert run["run_id"] == result.run_id
    assert int(run["leads_scored"]) == len(scores)
    assert int(run["accounts_labelled"]) == len(accounts)
    assert run["conversion_model_version"] == "1"
    assert json.loads(run["validation_summary"])["success"] is True


def test_same_date_twice_leaves_same_rows(flow_env):
    first = nightly_scores(as_of=AS_OF)
    before = read("SELECT lead_id, as_of FROM lead_scores ORDER BY lead_id")

    second = nightly_scores(as_of=AS_OF, retrain=False)

    after = read("SELECT lead_id, as_of FROM lead_scores ORDER BY lead_id")
    pd.testing.assert_frame_equal(before, after)
    assert read("SELECT COUNT(*) AS n FROM account_ltv")["n"].iloc[0] == first.accounts_labelled
    assert read("SELECT COUNT(*) AS n FROM volume_value_frontier")["n"].iloc[0] == 11
    runs = read("SELECT run_id, status FROM score_runs")
    assert sorted(runs["run_id"]) == sorted([first.run_id, second.run_id])
    assert set(runs["status"]) == {"succeeded"}


def test_failed_validation_keeps_last_good_scores(flow_env):
    good = nightly_scores(as_of=AS_OF)
    engine = sa.create_engine(load_settings().warehouse_url.get_secret_value())
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO invoices VALUES ('BAD-1', 'NO-SUCH-ACCOUNT', '2026-06-01 00:00:00', "
                "'2026-07-01 00:00:00', '2026-06-01 00:00:00', 10.0, 1.0, 'USD', 'charge')"
            )
        )
    engine.dispose()

    with pytest.raises(StageError, match="stage 'validate' failed.*invoices"):
        nightly_scores(as_of=AS_OF)

    scores = read("SELECT DISTINCT run_id FROM lead_scores")
    assert scores["run_id"].tolist() == [good.run_id]
    failed = read("SELECT * FROM score_runs WHERE status = 'failed'")
    assert len(failed) == 1
    assert failed["failed_stage"].iloc[0] == "validate"
    assert "NO-SUCH-ACCOUNT" in failed["message"].iloc[0]


def test_as_of_defaults_to_today_in_business_zone(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(business_timezone="Pacific/Kiritimati")
    today_there = pd.Timestamp.now(tz="Pacific/Kiritimati").date()

    assert resolve_as_of(None, settings) == today_there
    assert resolve_as_of("2024-02-29", settings) == dt.date(2024, 2, 29)


def test_run_without_billing_scores_conversion_only(flow_env, monkeypatch):
    monkeypatch.setenv(
        "FULCRUM_SOURCES",
        '{"billing_accounts": {"absent": true}, "invoices": {"absent": true}}',
    )

    result = nightly_scores(as_of=AS_OF)

    scores = read("SELECT * FROM lead_scores")
    assert len(scores) == result.leads_scored > 0
    assert scores["predicted_ltv"].isna().all()
    assert scores["value_model_version"].isna().all()
    assert read("SELECT COUNT(*) AS n FROM account_ltv")["n"].iloc[0] == 0
    assert any("skipped LTV labels and the value model" in note for note in result.notes)


def test_run_without_crm_publishes_labels_only(flow_env, monkeypatch):
    monkeypatch.setenv(
        "FULCRUM_SOURCES",
        '{"leads": {"absent": true}, "lead_events": {"absent": true}, '
        '"opportunities": {"absent": true}}',
    )

    result = nightly_scores(as_of=AS_OF)

    assert result.status == "succeeded"
    assert read("SELECT COUNT(*) AS n FROM lead_scores")["n"].iloc[0] == 0
    assert read("SELECT COUNT(*) AS n FROM account_ltv")["n"].iloc[0] == result.accounts_labelled > 0
    assert any("skipped features, both models and scoring" in note for note in result.notes)
