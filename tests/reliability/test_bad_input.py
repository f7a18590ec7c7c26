"""Bad source data through the nightly flow: the run goes on with right output, or stops.

A run that stops must do so before publishing, with a message naming the table, the column,
the rule and example values, and the scores of the previous good run stay in place. Each
test breaks a private copy of a scored 2,000-lead company and runs the real flow on it.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest

from flows.nightly import StageError, nightly_scores
from tests.reliability.checks import assert_run_stopped, snapshot
from tests.reliability.data import (
    UNUSUAL_ACCOUNT_IDS,
    UNUSUAL_LEAD_IDS,
    UNUSUAL_SEGMENT,
    recent_lead_ids,
    rename_leads_and_accounts,
)
from tests.reliability.workspace import AS_OF, CUTOFF_TEXT

pytestmark = pytest.mark.slow


def stop_run(**kwargs) -> StageError:
    """Run the flow as of AS_OF, expecting it to stop, and return the error."""
    with pytest.raises(StageError) as raised:
        nightly_scores(as_of=AS_OF, retrain=kwargs.pop("retrain", False), **kwargs)
    return raised.value


@pytest.mark.parametrize("table", ["leads", "opportunities", "billing_accounts", "invoices"])
def test_empty_source_stops_run(workspace, table):
    before = snapshot(workspace)
    workspace.execute(f"DELETE FROM {table}")

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "validate",
        f"{table}: expect_table_row_count_to_be_between failed (observed value: 0)",
    )


def test_empty_lead_events_scores_every_open_lead(workspace):
    before = snapshot(workspace)
    workspace.execute("DELETE FROM lead_events")

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    assert [f["expectation"] for f in result.validation_summary["failures"]] == [
        "expect_table_row_count_to_be_between"
    ]
    scores = workspace.scores()
    assert set(scores["lead_id"]) == set(before.lead_scores["lead_id"])
    assert scores["p_convert"].between(0, 1).all()


def test_duplicate_lead_ids_stop_run(workspace):
    before = snapshot(workspace)
    leads = workspace.read("SELECT * FROM leads")
    repeated = recent_lead_ids(workspace, 2)
    workspace.replace_table("leads", pd.concat([leads, leads[leads["lead_id"].isin(repeated)]]))

    error = stop_run()

    row = assert_run_stopped(
        workspace, before, error, "validate",
        f"leads.lead_id: expect_column_values_to_be_unique failed for 4 of {len(leads) + 2:,} rows",
    )
    for lead_id in repeated:
        assert repr(lead_id) in row["message"]


def test_null_keys_stop_run(workspace):
    before = snapshot(workspace)
    leads = workspace.read("SELECT * FROM leads")
    leads.loc[leads["lead_id"] == recent_lead_ids(workspace, 1)[0], "lead_id"] = None
    workspace.replace_table("leads", leads)
    opportunities = workspace.read("SELECT * FROM opportunities ORDER BY opportunity_id")
    opportunities.loc[0, "lead_id"] = None
    workspace.replace_table("opportunities", opportunities)
    invoices = workspace.read("SELECT * FROM invoices ORDER BY invoice_id")
    invoices.loc[[0, 1], "account_id"] = None
    workspace.replace_table("invoices", invoices)

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "validate",
        f"leads.lead_id: expect_column_values_to_not_be_null failed for 1 of {len(leads):,} rows",
        "opportunities.lead_id: expect_column_values_to_not_be_null failed for 1 of",
        "invoices.account_id: expect_column_values_to_not_be_null failed for 2 of",
    )


def test_references_to_missing_rows_stop_run(workspace):
    before = snapshot(workspace)
    workspace.execute(
        "INSERT INTO opportunities VALUES ('O-ORPHAN', 'L-MISSING', NULL, "
        "'2026-06-01 10:00:00.000000', NULL, NULL)"
    )
    workspace.execute(
        "INSERT INTO invoices VALUES ('INV-ORPHAN', 'A-MISSING', '2026-06-01 00:00:00.000000', "
        "'2026-07-01 00:00:00.000000', '2026-06-01 00:00:00.000000', 99.0, 9.0, 'USD', 'charge')"
    )

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "validate",
        "opportunities.lead_id: opportunity_lead_exists failed for 1 of",
        "(examples: 'L-MISSING')",
        "invoices.account_id: invoice_account_exists failed for 1 of",
        "(examples: 'A-MISSING')",
    )


def test_references_the_run_survives_are_warned(workspace):
    before = snapshot(workspace)
    converted = recent_lead_ids(workspace, 1)[0]
    workspace.execute(
        "INSERT INTO opportunities VALUES ('O-WON', :lead, 'A-NOT-BILLED', "
        "'2026-06-20 10:00:00.000000', '2026-06-25 10:00:00.000000', 1)",
        lead=converted,
    )
    workspace.execute(
        "INSERT INTO lead_events VALUES ('L-GHOST', 'page_view', '2026-06-29 10:00:00.000000')"
    )

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    scores = workspace.scores()
    assert set(scores["lead_id"]) == set(before.lead_scores["lead_id"]) - {converted}
    warnings = {failure["expectation"] for failure in result.validation_summary["failures"]}
    assert warnings == {"won_opportunity_account_exists", "lead_event_lead_exists"}
    assert all(f["severity"] == "warning" for f in result.validation_summary["failures"])


def test_text_and_nan_amounts_stop_run(workspace):
    before = snapshot(workspace)
    invoice_ids = workspace.read("SELECT invoice_id FROM invoices ORDER BY invoice_id LIMIT 2")
    first, second = invoice_ids["invoice_id"]
    workspace.execute("UPDATE invoices SET amount = 'n/a' WHERE invoice_id = :id", id=first)
    workspace.execute("UPDATE invoices SET cost = 'NaN' WHERE invoice_id = :id", id=second)

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "validate",
        "invoices.amount: expect_column_values_to_be_in_type_list failed for 1 of",
        "(examples: 'n/a')",
        "invoices.cost: expect_column_values_to_be_in_type_list failed for 1 of",
        "(examples: 'NaN')",
    )


def test_optional_column_mostly_null_is_scored(workspace):
    before = snapshot(workspace)
    changed = workspace.execute("UPDATE leads SET industry = NULL WHERE rowid % 10 != 0")
    assert changed >= 0.9 * 2_000 - 1

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    scores = workspace.scores()
    assert set(scores["lead_id"]) == set(before.lead_scores["lead_id"])
    assert scores["p_convert"].between(0, 1).all()
    assert scores["predicted_ltv"].gt(0).all()


def test_required_column_mostly_null_stops_run(workspace):
    before = snapshot(workspace)
    invoices = workspace.read("SELECT * FROM invoices ORDER BY invoice_id")
    blanked = invoices.index % 10 != 0
    invoices.loc[blanked, "cost"] = None
    workspace.replace_table("invoices", invoices)
    visible = workspace.read(
        "SELECT COUNT(*) AS n FROM invoices WHERE issued_at < :cutoff", cutoff=CUTOFF_TEXT
    )["n"].iloc[0]
    visible_blanked = workspace.read(
        "SELECT COUNT(*) AS n FROM invoices WHERE issued_at < :cutoff AND cost IS NULL",
        cutoff=CUTOFF_TEXT,
    )["n"].iloc[0]

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "validate",
        f"invoices.cost: expect_column_values_to_not_be_null failed for {visible_blanked:,} "
        f"of {visible:,} rows",
    )


def test_rows_dated_after_cutoff_change_nothing(workspace):
    before = snapshot(workspace)
    open_lead, later_lead = recent_lead_ids(workspace, 2)
    # Just past the cutoff (inside the SQL pre-filter's margin) and far in the future.
    for lead_id, created in (("L-SOON", "2026-07-01 00:00:01.000000"), ("L-2999", "2999-01-01 00:00:00.000000")):
        workspace.execute(
            "INSERT INTO leads VALUES (:id, :created, 'organic', 'retail', 10, 'emea', 'ic', "
            "NULL, 'DE')",
            id=lead_id, created=created,
        )
    workspace.execute(
        "INSERT INTO lead_events VALUES (:lead, 'demo_request', '2026-07-01 08:00:00.000000')",
        lead=open_lead,
    )
    workspace.execute(
        "INSERT INTO opportunities VALUES ('O-LATER', :lead, 'A-LATER', "
        "'2026-06-29 10:00:00.000000', '2026-07-02 10:00:00.000000', 1)",
        lead=later_lead,
    )
    workspace.execute(
        "UPDATE leads SET disqualified_at = '2026-07-03 00:00:00.000000' WHERE lead_id = :lead",
        lead=open_lead,
    )
    workspace.execute(
        "INSERT INTO invoices SELECT 'INV-LATER', account_id, '2026-07-01 00:00:00.000000', "
        "'2026-08-01 00:00:00.000000', '2030-01-01 00:00:00.000000', 5000.0, 1.0, 'USD', "
        "'charge' FROM billing_accounts LIMIT 1"
    )

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    after = snapshot(workspace)
    ignored = ["run_id"]
    pd.testing.assert_frame_equal(
        after.lead_scores.drop(columns=ignored), before.lead_scores.drop(columns=ignored)
    )
    pd.testing.assert_frame_equal(
        after.account_ltv.drop(columns=ignored), before.account_ltv.drop(columns=ignored)
    )


def test_two_currencies_stop_run(workspace):
    before = snapshot(workspace)
    euro_accounts = convert_accounts_to_euro(workspace, 3)
    accounts = workspace.read(
        "SELECT COUNT(*) AS n FROM billing_accounts WHERE started_at < :cutoff", cutoff=CUTOFF_TEXT
    )["n"].iloc[0]

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "validate",
        f"billing_accounts.currency: accounts_share_one_currency failed for 3 of {accounts:,} rows "
        "(examples: 'EUR')",
        f"Accounts are billed in 2 currencies (USD {accounts - 3:,}, EUR 3)",
        "set allow_mixed_currencies = true",
    )
    assert len(euro_accounts) == 3


def test_two_currencies_run_when_allowed(workspace, monkeypatch):
    before = snapshot(workspace)
    euro_accounts = convert_accounts_to_euro(workspace, 3)
    monkeypatch.setenv("FULCRUM_ALLOW_MIXED_CURRENCIES", "true")

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    labels = workspace.read("SELECT * FROM account_ltv ORDER BY account_id")
    by_currency = labels.groupby("currency")["account_id"].apply(set).to_dict()
    assert by_currency["EUR"] == set(euro_accounts)
    # The amounts are the same numbers as before, now labelled in euros: nothing was converted.
    old = before.account_ltv.set_index("account_id")
    new = labels.set_index("account_id")
    pd.testing.assert_series_equal(new["revenue"], old["revenue"])


def convert_accounts_to_euro(workspace, count: int) -> list[str]:
    """Bill the first ``count`` accounts, and their invoices, in EUR; return their ids."""
    accounts = workspace.read(
        "SELECT account_id FROM billing_accounts ORDER BY account_id LIMIT :count", count=count
    )["account_id"].tolist()
    for account_id in accounts:
        workspace.execute(
            "UPDATE billing_accounts SET currency = 'EUR' WHERE account_id = :id", id=account_id
        )
        workspace.execute("UPDATE invoices SET currency = 'EUR' WHERE account_id = :id", id=account_id)
    return accounts


def test_window_without_conversions_keeps_champions(workspace):
    before = snapshot(workspace)
    workspace.execute("UPDATE opportunities SET won = 0 WHERE won = 1")

    result = nightly_scores(as_of=AS_OF, retrain=True)

    assert result.status == "succeeded"
    assert result.conversion_model_version == "1"
    assert result.value_model_version == "1"
    assert any(note.startswith("conversion model: not retrained") for note in result.notes)
    assert any(note.startswith("value model: not retrained") for note in result.notes)
    # With no deal won, every lead created before the cutoff and not disqualified is open.
    open_leads = workspace.read(
        "SELECT lead_id FROM leads WHERE created_at < :cutoff AND disqualified_at IS NULL",
        cutoff=CUTOFF_TEXT,
    )
    assert set(workspace.scores()["lead_id"]) == set(open_leads["lead_id"])
    assert len(open_leads) > len(before.lead_scores)


def test_too_few_conversions_without_champion_stops_run(workspace, monkeypatch):
    before = snapshot(workspace)
    monkeypatch.setenv("FULCRUM_MODEL__MIN_TRAINING_POSITIVES", "100000")
    monkeypatch.setenv("FULCRUM_MODEL__MIN_VALUE_TRAINING_ROWS", "100000")
    monkeypatch.setenv("FULCRUM_CONVERSION_MODEL_NAME", "fulcrum-conversion-untrained")

    error = stop_run(retrain=True)

    assert_run_stopped(
        workspace, before, error, "score",
        "no conversion model is registered yet and this run could not train one",
    )


def test_all_leads_converted_publishes_no_open_leads(workspace):
    workspace.execute(
        "INSERT INTO opportunities "
        "SELECT 'O-ALL-' || lead_id, lead_id, NULL, created_at, "
        "max(created_at, '2026-06-30 23:59:00.000000'), 1 FROM leads "
        "WHERE created_at < :cutoff AND lead_id NOT IN "
        "(SELECT lead_id FROM opportunities WHERE won = 1)",
        cutoff=CUTOFF_TEXT,
    )

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    assert result.leads_scored == 0
    assert len(workspace.scores()) == 0
    frontier = workspace.read("SELECT * FROM volume_value_frontier")
    assert len(frontier) == 11
    assert frontier["expected_conversions"].eq(0).all()
    assert len(workspace.read("SELECT * FROM account_ltv")) == result.accounts_labelled > 0


def test_missing_feature_column_stops_scoring(workspace, monkeypatch):
    before = snapshot(workspace)
    # The champions were trained with the extra leads column 'country'; map leads without it.
    monkeypatch.setenv(
        "FULCRUM_SOURCES",
        '{"leads": {"sql": "SELECT lead_id, created_at, channel, industry, employees, region, '
        'seniority, disqualified_at FROM leads"}}',
    )

    error = stop_run()

    assert_run_stopped(
        workspace, before, error, "score",
        "conversion model fulcrum-conversion version 1 needs the input column(s) ['country']",
        "run with retraining",
    )


def test_failing_sql_mapping_stops_extract_without_retry(workspace, monkeypatch):
    before = snapshot(workspace)
    monkeypatch.setenv(
        "FULCRUM_SOURCES", '{"invoices": {"sql": "SELECT * FROM stripe_invoices"}}'
    )
    monkeypatch.setenv("FULCRUM_EXTRACT_RETRY_DELAYS_SECONDS", "[30]")

    started = time.monotonic()
    error = stop_run()

    assert time.monotonic() - started < 30
    assert_run_stopped(
        workspace, before, error, "extract",
        "source 'invoices' is mapped to a SQL query that failed",
        "no such table: stripe_invoices",
    )


def test_unseen_categories_and_unusual_text_round_trip(workspace):
    lead_ids = recent_lead_ids(workspace, len(UNUSUAL_LEAD_IDS))
    account_ids = workspace.read(
        "SELECT account_id FROM account_ltv WHERE ltv IS NOT NULL ORDER BY account_id LIMIT 2"
    )["account_id"].tolist()
    rename_leads_and_accounts(workspace, lead_ids, account_ids)

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    assert result.validation_summary["failed"] == 0
    scores = workspace.scores().set_index("lead_id")
    for lead_id in UNUSUAL_LEAD_IDS:
        assert lead_id in scores.index
        assert 0 <= scores.loc[lead_id, "p_convert"] <= 1
        assert scores.loc[lead_id, "predicted_ltv"] > 0
    assert not set(lead_ids) & set(scores.index)
    labels = workspace.read("SELECT * FROM account_ltv").set_index("account_id")
    for account_id in UNUSUAL_ACCOUNT_IDS:
        assert labels.loc[account_id, "segment"] == UNUSUAL_SEGMENT
        assert labels.loc[account_id, "ltv"] > 0


def test_segment_without_churn_gets_finite_ltv(workspace, monkeypatch):
    from fulcrum.settings import load_settings
    from tasks.extract import as_of_cutoff, extract_sources
    from tasks.labels import coverage_spells

    settings = load_settings()
    cutoff = as_of_cutoff(AS_OF, settings.business_timezone)
    frames = extract_sources(settings, AS_OF)
    spells = coverage_spells(frames.invoices, cutoff, settings.ltv.churn_grace_days)
    churned = spells.groupby("account_id")["churned"].any()
    steady = churned[~churned].index[:20].tolist()
    workspace.execute(
        f"UPDATE billing_accounts SET plan = 'steady' WHERE account_id IN "
        f"({', '.join(repr(account_id) for account_id in steady)})"
    )
    # Without the prior that pulls each segment toward the overall rate, the churn rate of a
    # segment whose accounts never churned is exactly zero.
    monkeypatch.setenv("FULCRUM_LTV__CHURN_PRIOR_MONTHS", "0")

    result = nightly_scores(as_of=AS_OF, retrain=False)

    assert result.status == "succeeded"
    labels = workspace.read("SELECT * FROM account_ltv")
    steady_labels = labels[labels["segment"] == "steady"]
    assert len(steady_labels) == len(steady) == 20
    assert steady_labels["churn_rate"].eq(0).all()
    assert steady_labels["expected_lifetime_months"].eq(settings.ltv.lifetime_cap_months).all()
    valued = steady_labels.dropna(subset=["arpu", "gross_margin"])
    assert len(valued) > 0
    expected = valued["arpu"] * valued["gross_margin"] * settings.ltv.lifetime_cap_months
    pd.testing.assert_series_equal(valued["ltv"], expected, check_names=False)
    others = labels[labels["segment"] != "steady"]
    assert others["churn_rate"].max() > 0
    assert labels["ltv"].dropna().map(math.isfinite).all()
