"""The backfill-scores flow: dates in order, idempotent partitions, skips, failures, champions."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pandas as pd
import pytest
import sqlalchemy as sa
from mlflow import MlflowClient

import flows.nightly
from flows.backfill import BackfillError, backfill_dates, backfill_scores
from fulcrum.cli import main as cli_main
from fulcrum.settings import load_settings
from tasks.train import CHAMPION_FROM_TAG, champion_version_as_of
from tests.flows.conftest import TRAINED_AS_OF

FIRST = TRAINED_AS_OF + dt.timedelta(days=2)
FIVE_DATES = [FIRST + dt.timedelta(days=offset) for offset in range(5)]
LAST = FIVE_DATES[-1]


def read(sql: str, **params) -> pd.DataFrame:
    engine = sa.create_engine(load_settings().warehouse_url.get_secret_value())
    with engine.connect() as connection:
        frame = pd.read_sql_query(sa.text(sql), connection, params=params)
    engine.dispose()
    return frame


def output_rows() -> dict[str, pd.DataFrame]:
    """Every row of the four output tables, in a fixed order."""
    return {
        "lead_scores": read("SELECT * FROM lead_scores ORDER BY as_of, lead_id"),
        "account_ltv": read("SELECT * FROM account_ltv ORDER BY as_of, account_id"),
        "volume_value_frontier": read(
            "SELECT * FROM volume_value_frontier ORDER BY as_of, overlay_weight"
        ),
        "score_runs": read("SELECT * FROM score_runs ORDER BY started_at"),
    }


def read_progress(flow_run_id) -> list[float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
        return [artifact.data for artifact in artifacts if artifact.type == "progress"]

    return asyncio.run(fetch())


@pytest.mark.parametrize(
    ("start", "end", "every", "expected"),
    [
        ("2026-01-30", "2026-02-02", "day", ["2026-01-30", "2026-01-31", "2026-02-01", "2026-02-02"]),
        ("2026-01-01", "2026-01-20", "week", ["2026-01-01", "2026-01-08", "2026-01-15"]),
        ("2024-01-31", "2024-04-30", "month", ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30"]),
        (dt.date(2026, 3, 1), "2026-03-01", "day", ["2026-03-01"]),
    ],
)
def test_backfill_dates_step_from_start(start, end, every, expected):
    assert [day.isoformat() for day in backfill_dates(start, end, every)] == expected


@pytest.mark.parametrize(
    ("start", "end", "every", "message"),
    [
        ("2024-02-30", "2024-03-02", "day", r"start must be a valid ISO date .*'2024-02-30'"),
        ("2024-02-01", "2024-13-01", "day", r"end must be a valid ISO date .*'2024-13-01'"),
        ("2024-03-02", "2024-03-01", "day", r"end must not be before start"),
        ("2024-03-01", "2024-03-02", "hour", r"every must be one of \['day', 'week', 'month'\]"),
        (dt.datetime(2024, 3, 1, 12), "2024-03-02", "day", r"start must be a date without a time"),
        (20240301, "2024-03-02", "day", r"start must be an ISO date"),
    ],
)
def test_backfill_dates_reject_invalid_input(start, end, every, message):
    with pytest.raises(ValueError, match=message):
        backfill_dates(start, end, every)


def test_cli_rejects_impossible_date_at_once(capsys):
    code = cli_main(["backfill", "--start", "2024-02-30", "--end", "2024-03-02"])

    assert code == 2
    error = capsys.readouterr().err
    assert "start must be a valid ISO date such as '2024-02-29'. Got '2024-02-30'" in error


def test_flow_rejects_impossible_date_before_any_work(tmp_path, monkeypatch, prefect_api):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FULCRUM_WAREHOUSE_URL", f"sqlite:///{tmp_path / 'warehouse.db'}")

    state = backfill_scores(start="2024-02-30", end="2024-03-02", return_state=True)

    assert state.is_failed()
    assert "start must be a valid ISO date" in state.message
    assert not (tmp_path / "warehouse.db").exists()


@pytest.mark.slow
def test_champion_as_of_picks_newest_promoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = settings.mlflow_tracking_uri.get_secret_value()
    # Without registry_uri, MlflowClient uses the registry that an earlier test set globally.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = settings.conversion_model_name
    client.create_registered_model(name)
    versions = [
        ("2026-01-01", "2026-01-01T02:30:00+00:00"),
        ("2026-02-01", None),  # rejected: never champion
        ("2026-03-01", "2026-03-01T02:30:00+00:00"),
        ("2026-01-15", "2026-03-05T10:00:00+00:00"),  # promoted later, by a backfill
    ]
    for as_of, promoted_at in versions:
        tags = {"as_of": as_of}
        if promoted_at:
            tags[CHAMPION_FROM_TAG] = promoted_at
        client.create_model_version(name, source=(tmp_path / "model").as_uri(), tags=tags)

    def version_on(day: str) -> str | None:
        return champion_version_as_of(settings, "conversion", dt.date.fromisoformat(day))

    assert version_on("2025-12-31") is None
    assert version_on("2026-01-10") == "1"
    assert version_on("2026-02-15") == "4"
    assert version_on("2026-03-01") == "3"


@pytest.mark.slow
def test_backfill_writes_five_partitions_and_repeat_changes_nothing(trained_env):
    state = backfill_scores(start=FIRST.isoformat(), end=LAST.isoformat(), return_state=True)

    assert state.is_completed()
    report = state.result()
    assert [outcome.as_of for outcome in report.outcomes] == FIVE_DATES
    assert {outcome.status for outcome in report.outcomes} == {"succeeded"}
    runs = read("SELECT * FROM score_runs WHERE flow_name = 'backfill-scores' ORDER BY started_at")
    assert runs["as_of"].astype(str).tolist() == [day.isoformat() for day in FIVE_DATES]
    assert set(runs["status"]) == {"succeeded"}
    for _, run in runs.iterrows():
        notes = json.loads(run["metrics"])["notes"]
        assert f"conversion model: scored with version 1, the champion as of {run['as_of']}" in notes
        assert f"value model: scored with version 1, the champion as of {run['as_of']}" in notes
        partition = read("SELECT DISTINCT run_id FROM lead_scores WHERE as_of = :d", d=run["as_of"])
        assert partition["run_id"].tolist() == [run["run_id"]]
    scored_dates = read("SELECT DISTINCT as_of FROM lead_scores WHERE as_of > :d", d=TRAINED_AS_OF)
    assert len(scored_dates) == 5
    assert read_progress(state.state_details.flow_run_id) == [100.0]
    before = output_rows()

    repeat = backfill_scores(start=FIRST.isoformat(), end=LAST.isoformat())

    assert [outcome.status for outcome in repeat.outcomes] == ["skipped"] * 5
    assert [outcome.run_id for outcome in repeat.outcomes] == runs["run_id"].tolist()
    after = output_rows()
    for name, rows in before.items():
        pd.testing.assert_frame_equal(rows, after[name], obj=name)


@pytest.mark.slow
def test_resumed_backfill_skips_finished_dates(trained_env):
    first = backfill_scores(start=FIRST.isoformat(), end=FIVE_DATES[1].isoformat())

    resumed = backfill_scores(start=FIRST.isoformat(), end=FIVE_DATES[2].isoformat())

    statuses = [(outcome.as_of, outcome.status) for outcome in resumed.outcomes]
    assert statuses == [
        (FIVE_DATES[0], "skipped"), (FIVE_DATES[1], "skipped"), (FIVE_DATES[2], "succeeded")
    ]
    assert [outcome.run_id for outcome in resumed.outcomes[:2]] == [
        outcome.run_id for outcome in first.outcomes
    ]

    forced = backfill_scores(start=FIRST.isoformat(), end=FIRST.isoformat(), force=True)

    assert forced.outcomes[0].status == "succeeded"
    partition = read("SELECT DISTINCT run_id FROM lead_scores WHERE as_of = :d", d=FIRST)
    assert partition["run_id"].tolist() == [forced.outcomes[0].run_id]


@pytest.mark.slow
def test_failing_date_does_not_stop_the_others(trained_env, monkeypatch):
    dates = FIVE_DATES[:3]
    failing = dates[1]
    extract = flows.nightly.extract_sources_task

    def extract_failing_on_one_date(settings, as_of):
        if as_of == failing:
            raise ConnectionError("the CRM replica refused the connection")
        return extract(settings, as_of)

    monkeypatch.setattr(flows.nightly, "extract_sources_task", extract_failing_on_one_date)

    state = backfill_scores(start=dates[0].isoformat(), end=dates[-1].isoformat(), return_state=True)

    assert state.is_failed()
    assert f"1 of 3 backfill dates failed: {failing} (stage 'extract' failed" in state.message
    with pytest.raises(BackfillError) as raised:
        state.result()
    report = raised.value.report
    assert [outcome.status for outcome in report.outcomes] == ["succeeded", "failed", "succeeded"]
    assert "the CRM replica refused the connection" in report.outcomes[1].detail
    scored = read(
        "SELECT DISTINCT as_of FROM lead_scores WHERE as_of > :d ORDER BY as_of", d=TRAINED_AS_OF
    )
    assert scored["as_of"].astype(str).tolist() == [dates[0].isoformat(), dates[2].isoformat()]
    failed = read("SELECT as_of, failed_stage FROM score_runs WHERE status = 'failed'")
    assert failed.values.tolist() == [[failing.isoformat(), "extract"]]


@pytest.mark.slow
def test_cli_backfill_before_first_champion_notes_model(trained_env, capsys):
    early = TRAINED_AS_OF - dt.timedelta(days=10)

    code = cli_main(["backfill", "--start", early.isoformat(), "--end", early.isoformat()])

    assert code == 0
    output = capsys.readouterr().out
    assert f"{early}  succeeded" in output
    assert "1 date: 1 succeeded, 0 skipped, 0 failed" in output
    metrics = read("SELECT metrics FROM score_runs WHERE as_of = :d", d=early)["metrics"].iloc[0]
    notes = json.loads(metrics)["notes"]
    assert (
        f"conversion model: the registry records no champion as of {early}, so the current "
        f"champion version 1 scored"
    ) in notes
