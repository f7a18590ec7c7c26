"""Assertions shared by the reliability tests: what a stopped run must leave behind."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tests.reliability.workspace import Workspace


@dataclass
class Outputs:
    """The rows of the four output tables at one moment."""

    lead_scores: pd.DataFrame
    account_ltv: pd.DataFrame
    frontier: pd.DataFrame
    score_runs: pd.DataFrame


def snapshot(workspace: Workspace) -> Outputs:
    return Outputs(
        lead_scores=workspace.scores(),
        account_ltv=workspace.read("SELECT * FROM account_ltv ORDER BY as_of, account_id"),
        frontier=workspace.read(
            "SELECT * FROM volume_value_frontier ORDER BY as_of, overlay_weight"
        ),
        score_runs=workspace.runs(),
    )


def assert_published_nothing(workspace: Workspace, before: Outputs) -> None:
    """Check that the score tables still hold exactly the rows of ``before``."""
    after = snapshot(workspace)
    pd.testing.assert_frame_equal(after.lead_scores, before.lead_scores)
    pd.testing.assert_frame_equal(after.account_ltv, before.account_ltv)
    pd.testing.assert_frame_equal(after.frontier, before.frontier)


def assert_run_stopped(
    workspace: Workspace, before: Outputs, error: BaseException, stage: str, *fragments: str
) -> pd.Series:
    """Check that a run stopped in ``stage`` before publishing and recorded why.

    The error and the run's failed score_runs row must both contain every fragment, the
    earlier score_runs rows must be unchanged, and the score tables must hold the rows of
    ``before``. Returns the failed row.
    """
    assert getattr(error, "stage", None) == stage, str(error)
    for fragment in fragments:
        assert fragment in str(error)

    assert_published_nothing(workspace, before)

    runs = workspace.runs()
    earlier = runs[runs["run_id"].isin(before.score_runs["run_id"])]
    assert records(earlier) == records(before.score_runs)
    new = runs[~runs["run_id"].isin(before.score_runs["run_id"])]
    assert len(new) == 1
    row = new.iloc[0]
    assert row["status"] == "failed"
    assert row["failed_stage"] == stage
    assert row["finished_at"] is not None
    for fragment in fragments:
        assert fragment in row["message"]
    return row


def records(frame: pd.DataFrame) -> list[dict]:
    """The rows as dicts, with every missing value as None, for comparisons across dtypes."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def scored_lead_ids(outputs: Outputs) -> set[str]:
    return set(outputs.lead_scores["lead_id"])
