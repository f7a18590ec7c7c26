"""Tests for the validation stage: GX suites, cross-table checks, report and Prefect task."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fulcrum.contract import SOURCES
from tasks import validate
from tasks.extract import SourceFrames
from tasks.validate import (
    DEFAULT_SUITE_DIR,
    DataValidationError,
    ExpectationResult,
    ValidationReport,
    validate_sources,
    validate_sources_task,
)

AS_OF = datetime.date(2024, 5, 1)
CUTOFF = pd.Timestamp("2024-05-01", tz="UTC")


def utc(*values: str | None) -> pd.Series:
    return pd.Series(pd.to_datetime(list(values), utc=True))


def make_frames() -> SourceFrames:
    """Return a small valid set: 3 leads, 3 events, 2 opportunities, 2 accounts, 10 invoices."""
    leads = pd.DataFrame(
        {
            "lead_id": ["L1", "L2", "L3"],
            "created_at": utc("2024-04-01", "2024-04-20", "2024-04-28"),
            "channel": ["organic", None, "referral"],
            "industry": ["saas", "retail", None],
            "employees": [10.0, np.nan, 250.0],
            "region": ["emea", "na", "na"],
            "seniority": ["vp", None, "ic"],
            "disqualified_at": utc(None, "2024-04-25", None),
        }
    )
    lead_events = pd.DataFrame(
        {
            "lead_id": ["L1", "L1", "L3"],
            "event_type": ["pricing_page_view", "demo_request", "email_open"],
            "occurred_at": utc("2024-04-02", "2024-04-03", "2024-04-29"),
        }
    )
    opportunities = pd.DataFrame(
        {
            "opportunity_id": ["O1", "O2"],
            "lead_id": ["L1", "L3"],
            "account_id": ["A1", None],
            "created_at": utc("2024-04-05", "2024-04-29"),
            "closed_at": utc("2024-04-10", None),
            "won": pd.array([True, None], dtype="boolean"),
        }
    )
    billing_accounts = pd.DataFrame(
        {
            "account_id": ["A1", "A2"],
            "started_at": utc("2024-04-10", "2023-01-01"),
            "cancelled_at": utc(None, "2024-03-01"),
            "plan": ["pro", None],
            "currency": ["USD", "USD"],
        }
    )
    starts = ["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01"] * 2 + ["2024-04-10"] * 2
    ends = ["2024-02-01", "2024-03-01", "2024-04-01", "2024-05-01"] * 2 + ["2024-05-10"] * 2
    invoices = pd.DataFrame(
        {
            "invoice_id": [f"I{number}" for number in range(1, 11)],
            "account_id": ["A2"] * 8 + ["A1"] * 2,
            "period_start": utc(*starts),
            "period_end": utc(*ends),
            "issued_at": utc(*starts),
            "amount": [50.0, 50.0, 50.0, 50.0, 50.0, 50.0, -20.0, -5.0, 100.0, 100.0],
            "cost": [5.0] * 6 + [0.0, 0.0] + [10.0, 10.0],
            "currency": ["USD"] * 10,
            "kind": ["charge"] * 6 + ["refund", "credit"] + ["charge"] * 2,
        }
    )
    return SourceFrames(leads, lead_events, opportunities, billing_accounts, invoices)


@pytest.fixture
def settings(settings_factory):
    return settings_factory()


@pytest.fixture
def run(settings, tmp_path: Path):
    """Validate frames with the shipped suites, writing reports under the test's folder."""

    def run_validation(frames: SourceFrames, **kwargs) -> ValidationReport:
        return validate_sources(frames, AS_OF, CUTOFF, settings, tmp_path / "reports", **kwargs)

    return run_validation


def find_result(
    report: ValidationReport,
    table: str,
    expectation: str,
    column: str | None = None,
    condition: str | None = None,
) -> ExpectationResult:
    """Return the one result of ``expectation`` on ``table`` (and ``column``, if given)."""
    matches = [
        result
        for result in report.results[table]
        if result.expectation == expectation
        and (column is None or column in result.columns)
        and (condition is None or (result.condition or "").startswith(condition))
    ]
    assert len(matches) == 1, [result.describe() for result in report.results[table]]
    return matches[0]


def critical_message(report: ValidationReport) -> str:
    with pytest.raises(DataValidationError) as raised:
        report.raise_for_failures()
    return str(raised.value)


@pytest.mark.parametrize("id_dtype", ["str", "object"])
def test_valid_sources_pass(run, id_dtype):
    frames = make_frames()
    # extract_sources returns ids as object columns; pandas 3 builds str columns by default.
    for table, frame in frames.items():
        for column in [c.name for c in SOURCES[table].columns if c.kind == "string"]:
            frame[column] = frame[column].astype(id_dtype)

    report = run(frames)

    assert report.success
    assert report.failures(None) == []
    assert report.evaluated_count > 0
    for table, counts in report.table_counts().items():
        assert counts["evaluated"] > 0, table
        assert counts["errored"] == 0, table
    report.raise_for_failures()


def test_duplicate_lead_ids_fail(run):
    frames = make_frames()
    frames.leads.loc[1, "lead_id"] = "L1"

    report = run(frames)

    result = find_result(report, "leads", "expect_column_values_to_be_unique", "lead_id")
    assert not report.success
    assert result.failing_count == 2
    assert result.examples == ["L1"]
    assert "leads.lead_id: expect_column_values_to_be_unique failed for 2 of 3 rows" in (
        critical_message(report)
    )


KEYS = [(table, contract.key[0]) for table, contract in SOURCES.items() if contract.key]


def test_null_keys_fail(run):
    frames = make_frames()
    for table, column in KEYS:
        getattr(frames, table).loc[0, column] = None

    report = run(frames)

    message = critical_message(report)
    for table, column in KEYS:
        result = find_result(report, table, "expect_column_values_to_not_be_null", column)
        assert result.failing_count == 1, table
        assert result.element_count == len(getattr(frames, table)), table
        assert f"{table}.{column}: expect_column_values_to_not_be_null failed for 1 of" in message
        assert find_result(report, table, "expect_column_values_to_be_unique", column).success


def test_opportunity_with_missing_lead_fails(run):
    frames = make_frames()
    frames.opportunities.loc[1, "lead_id"] = "L404"

    report = run(frames)

    result = find_result(report, "opportunities", "opportunity_lead_exists")
    assert result.failing_count == 1
    assert result.examples == ["L404"]
    assert (
        "opportunities.lead_id: opportunity_lead_exists failed for 1 of 2 rows (examples: 'L404')"
        in critical_message(report)
    )


def test_invoice_with_missing_account_fails(run):
    frames = make_frames()
    frames.invoices.loc[[0, 3], "account_id"] = "A404"

    report = run(frames)

    result = find_result(report, "invoices", "invoice_account_exists")
    assert result.failing_count == 2
    assert "invoices.account_id: invoice_account_exists failed for 2 of 10 rows" in (
        critical_message(report)
    )


def test_won_opportunity_without_account_warns(run):
    frames = make_frames()
    frames.opportunities.loc[0, "account_id"] = "A404"

    report = run(frames)

    result = find_result(report, "opportunities", "won_opportunity_account_exists")
    assert report.success
    assert result.severity == "warning"
    assert result.failing_count == 1
    assert result.element_count == 1
    assert result.examples == ["A404"]


def test_mixed_text_amounts_name_offending_values(run):
    frames = make_frames()
    frames.invoices["amount"] = frames.invoices["amount"].astype(object)
    frames.invoices.loc[2, "amount"] = "abc"

    report = run(frames)

    result = find_result(report, "invoices", "expect_column_values_to_be_in_type_list", "amount")
    assert result.failing_count == 1
    assert result.examples == ["abc"]
    assert (
        "invoices.amount: expect_column_values_to_be_in_type_list failed for 1 of 10 rows "
        "(examples: 'abc')" in critical_message(report)
    )


def test_text_amount_column_fails(run):
    frames = make_frames()
    frames.invoices["amount"] = frames.invoices["amount"].astype(str)

    report = run(frames)

    result = find_result(report, "invoices", "expect_column_values_to_be_in_type_list", "amount")
    assert result.failing_count == 10
    assert result.examples == ["50.0", "-20.0", "-5.0", "100.0"]
    # The sign rules cannot compare text with 0, so they are reported as errors.
    sign_rules = [
        rule
        for rule in report.results["invoices"]
        if rule.expectation == "expect_column_values_to_be_between" and rule.columns == ["amount"]
    ]
    assert [rule.errored for rule in sign_rules] == [True, True]
    assert not report.success


def test_nan_amount_fails(run):
    frames = make_frames()
    frames.invoices.loc[4, "amount"] = np.nan

    report = run(frames)

    result = find_result(report, "invoices", "expect_column_values_to_not_be_null", "amount")
    assert result.failing_count == 1
    assert "invoices.amount: expect_column_values_to_not_be_null failed for 1 of 10 rows" in (
        critical_message(report)
    )


def test_amount_sign_must_match_kind(run):
    frames = make_frames()
    frames.invoices.loc[0, "amount"] = -50.0  # a charge
    frames.invoices.loc[6, "amount"] = 20.0  # a refund
    frames.invoices.loc[7, "amount"] = 5.0  # a credit

    report = run(frames)

    between = "expect_column_values_to_be_between"
    charges = find_result(report, "invoices", between, "amount", condition="kind ==")
    refunds = find_result(report, "invoices", between, "amount", condition="kind IN")
    assert charges.condition == "kind == charge"
    assert charges.failing_count == 1
    assert charges.element_count == 8
    assert charges.examples == [-50.0]
    assert refunds.condition == "kind IN (refund, credit)"
    assert refunds.failing_count == 2
    assert refunds.element_count == 2
    assert refunds.examples == [20.0, 5.0]
    message = critical_message(report)
    assert (
        "invoices.amount where kind == charge: expect_column_values_to_be_between failed for "
        "1 of 8 rows (examples: -50.0)" in message
    )
    assert (
        "invoices.amount where kind IN (refund, credit): expect_column_values_to_be_between "
        "failed for 2 of 2 rows (examples: 20.0, 5.0)" in message
    )


def test_mostly_null_required_column_fails(run):
    frames = make_frames()
    frames.invoices.loc[1:, "cost"] = np.nan

    report = run(frames)

    result = find_result(report, "invoices", "expect_column_values_to_not_be_null", "cost")
    assert result.failing_count == 9
    assert result.element_count == 10
    # The range rule on cost checks only the one non-null value, so it passes.
    assert find_result(report, "invoices", "expect_column_values_to_be_between", "cost").success
    assert "invoices.cost: expect_column_values_to_not_be_null failed for 9 of 10 rows" in (
        critical_message(report)
    )


def test_period_end_before_start_fails(run):
    frames = make_frames()
    frames.invoices.loc[3, "period_end"] = pd.Timestamp("2023-12-31", tz="UTC")
    # An empty period is a one-off amount, which is allowed.
    frames.invoices.loc[7, "period_end"] = frames.invoices.loc[7, "period_start"]

    report = run(frames)

    result = find_result(
        report, "invoices", "expect_column_pair_values_a_to_be_greater_than_b", "period_end"
    )
    assert result.failing_count == 1
    assert result.columns == ["period_end", "period_start"]
    assert (
        "invoices.(period_end, period_start): expect_column_pair_values_a_to_be_greater_than_b "
        "failed for 1 of 10 rows" in critical_message(report)
    )


def test_open_opportunity_skips_close_order(run):
    frames = make_frames()
    frames.opportunities.loc[0, "closed_at"] = pd.Timestamp("2024-04-01", tz="UTC")

    report = run(frames)

    result = find_result(
        report, "opportunities", "expect_column_pair_values_a_to_be_greater_than_b", "closed_at"
    )
    # Row 1 is open. Comparing its NULL closed_at would fail, so a failing_count of 1 shows
    # that GX skipped it. GX still counts the row in element_count.
    assert result.failing_count == 1
    assert result.element_count == 2


def test_unknown_currency_fails(run):
    frames = make_frames()
    frames.billing_accounts.loc[1, "currency"] = "XXX"
    frames.invoices.loc[[1, 2], "currency"] = "usd"

    report = run(frames)

    accounts = find_result(report, "billing_accounts", "expect_column_values_to_be_in_set")
    invoices = find_result(report, "invoices", "expect_column_values_to_be_in_set", "currency")
    assert accounts.failing_count == 1
    assert accounts.examples == ["XXX"]
    assert invoices.failing_count == 2
    assert invoices.examples == ["usd"]
    message = critical_message(report)
    assert (
        "billing_accounts.currency: expect_column_values_to_be_in_set failed for 1 of 2" in message
    )
    assert "invoices.currency: expect_column_values_to_be_in_set failed for 2 of 10" in message


def test_currencies_come_from_settings(settings_factory, tmp_path):
    settings = settings_factory(currencies=["EUR"])

    report = validate_sources(make_frames(), AS_OF, CUTOFF, settings, tmp_path)

    result = find_result(report, "invoices", "expect_column_values_to_be_in_set", "currency")
    assert result.failing_count == 10


def test_accounts_in_two_currencies_fail(run):
    frames = make_frames()
    frames.billing_accounts.loc[1, "currency"] = "EUR"

    report = run(frames)

    result = find_result(report, "billing_accounts", "accounts_share_one_currency")
    assert result.severity == "critical"
    assert result.failing_count == 1
    assert result.examples == ["USD"]
    assert result.observed_value == {"EUR": 1, "USD": 1}
    message = critical_message(report)
    assert "billing_accounts.currency: accounts_share_one_currency failed for 1 of 2 rows" in message
    assert "billed in 2 currencies (EUR 1, USD 1)" in message


def test_mixed_currencies_warn_when_allowed(settings_factory, tmp_path):
    settings = settings_factory(allow_mixed_currencies=True)
    frames = make_frames()
    frames.billing_accounts.loc[1, "currency"] = "EUR"

    report = validate_sources(frames, AS_OF, CUTOFF, settings, tmp_path)

    result = find_result(report, "billing_accounts", "accounts_share_one_currency")
    assert result.severity == "warning"
    assert not result.success
    assert report.success


def test_unknown_invoice_kind_fails(run):
    frames = make_frames()
    frames.invoices.loc[0, "kind"] = "discount"

    report = run(frames)

    result = find_result(report, "invoices", "expect_column_values_to_be_in_set", "kind")
    assert result.failing_count == 1
    assert result.examples == ["discount"]


def test_empty_leads_fail(run):
    frames = make_frames()
    frames.leads = frames.leads.iloc[0:0]

    report = run(frames)

    result = find_result(report, "leads", "expect_table_row_count_to_be_between")
    assert result.observed_value == 0
    assert "leads: expect_table_row_count_to_be_between failed (observed value: 0)" in (
        critical_message(report)
    )


def test_empty_lead_events_only_warn(run):
    frames = make_frames()
    frames.lead_events = frames.lead_events.iloc[0:0]

    report = run(frames)

    result = find_result(report, "lead_events", "expect_table_row_count_to_be_between")
    assert not result.success
    assert result.severity == "warning"
    assert report.failures("warning") == [result]
    assert report.success
    report.raise_for_failures()


@pytest.mark.parametrize(("freshness_days", "expected_success"), [(7, False), (40, True)])
def test_stale_leads_fail_freshness(settings_factory, tmp_path, freshness_days, expected_success):
    settings = settings_factory(freshness_days=freshness_days)
    frames = make_frames()
    frames.leads["created_at"] = utc("2024-03-01", "2024-03-20", "2024-04-01")

    report = validate_sources(frames, AS_OF, CUTOFF, settings, tmp_path)

    result = find_result(report, "leads", "expect_column_max_to_be_between", "created_at")
    assert result.success is expected_success
    assert result.severity == "critical"
    assert result.observed_value == "2024-04-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("values", "failing_count"),
    [
        (pd.Series(["2024-04-01", "soon", "2024-04-28"]), 3),
        (pd.Series(pd.to_datetime(["2024-04-01", "2024-04-20", "2024-04-28"])), None),
    ],
    ids=["text", "timezone-naive"],
)
def test_non_utc_timestamps_fail(run, values, failing_count):
    frames = make_frames()
    frames.leads["created_at"] = values

    report = run(frames)

    result = find_result(report, "leads", "expect_column_values_to_be_of_type", "created_at")
    assert not result.success
    assert result.failing_count == failing_count
    assert not report.success


def test_empty_suite_directory_fails(run, tmp_path):
    suite_dir = tmp_path / "no_suites"
    suite_dir.mkdir()

    report = run(make_frames(), suite_dir=suite_dir)

    assert not report.success
    for table in SOURCES:
        result = find_result(report, table, "suite_file")
        assert result.severity == "critical"
        assert result.exception == f"suite file {suite_dir / table}.json not found"
    assert f"leads: suite file {suite_dir / 'leads.json'} not found" in critical_message(report)


def test_suite_without_expectations_fails(run, tmp_path):
    suite_dir = tmp_path / "suites"
    suite_dir.mkdir()
    (suite_dir / "leads.json").write_text(json.dumps({"name": "leads", "expectations": []}))

    report = run(make_frames(), suite_dir=suite_dir)

    result = find_result(report, "leads", "expectations_evaluated")
    assert result.severity == "critical"
    assert report.table_counts()["leads"] == {"evaluated": 0, "failed": 0, "errored": 1}
    assert "leads: suite file" in critical_message(report)
    assert "has no expectations, so nothing was checked" in result.exception


def test_naive_cutoff_is_rejected():
    with pytest.raises(ValueError, match="cutoff must be a timezone-aware timestamp"):
        validate_sources(make_frames(), AS_OF, pd.Timestamp("2024-05-01"), None, Path("unused"))


def test_report_without_results_fails():
    report = ValidationReport(as_of=AS_OF, cutoff=CUTOFF, results={})

    assert not report.success
    with pytest.raises(DataValidationError, match="evaluated no expectations"):
        report.raise_for_failures()


def test_missing_column_counts_as_error(run):
    frames = make_frames()
    frames.invoices = frames.invoices.drop(columns=["cost"])

    report = run(frames)

    result = find_result(report, "invoices", "expect_column_values_to_not_be_null", "cost")
    assert result.errored
    assert result.severity == "critical"
    assert 'The column "cost" in BatchData does not exist' in result.exception
    assert report.table_counts()["invoices"]["errored"] == 3
    assert "invoices.cost: expect_column_values_to_not_be_null raised an exception" in (
        critical_message(report)
    )


def test_raising_warning_expectation_is_critical(run):
    frames = make_frames()
    frames.leads = frames.leads.drop(columns=["employees"])

    report = run(frames)

    result = find_result(report, "leads", "expect_column_values_to_be_between", "employees")
    assert result.errored
    assert result.severity == "critical"
    assert result in report.failures("critical")


def copy_suite(table: str, suite_dir: Path) -> Path:
    """Copy one shipped suite file alone into ``suite_dir``, so only that source is validated."""
    suite_dir.mkdir(exist_ok=True)
    return Path(shutil.copy(DEFAULT_SUITE_DIR / f"{table}.json", suite_dir))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "plan"}},
            "meta.severity must be one of ('critical', 'warning'). Got None.",
        ),
        (
            {
                "type": "expect_column_values_to_be_in_set",
                "kwargs": {"column": "plan", "value_set": {"$PARAMETER": "plans"}},
                "meta": {"severity": "warning"},
            },
            "kwarg 'value_set' has the unknown placeholder 'plans'",
        ),
        (
            {
                "type": "expect_column_values_to_be_in_set",
                "kwargs": {"column": "plan", "value_set": ["pro", {"$PARAMETER": "cutoff"}]},
                "meta": {"severity": "warning"},
            },
            "kwarg 'value_set' has a placeholder inside it",
        ),
        (
            {"type": "expect_plan_to_be_nice", "kwargs": {}, "meta": {"severity": "warning"}},
            "expect_plan_to_be_nice",
        ),
    ],
    ids=["no severity", "unknown placeholder", "nested placeholder", "unknown expectation"],
)
def test_invalid_suite_entry_is_reported(run, tmp_path, entry, message):
    suite_path = copy_suite("billing_accounts", tmp_path / "suites")
    suite = json.loads(suite_path.read_text())
    suite["expectations"].append(entry)
    suite_path.write_text(json.dumps(suite))

    report = run(make_frames(), suite_dir=suite_path.parent)

    result = find_result(report, "billing_accounts", "suite_file")
    assert result.severity == "critical"
    assert message in result.exception
    assert report.table_counts()["billing_accounts"]["evaluated"] > 0
    assert not report.success


def test_suite_with_wrong_name_is_reported(run, tmp_path):
    suite_dir = tmp_path / "suites"
    suite_dir.mkdir()
    (suite_dir / "leads.json").write_text(json.dumps({"name": "lead", "expectations": []}))

    report = run(make_frames(), suite_dir=suite_dir)

    result = find_result(report, "leads", "suite_file")
    assert "must have \"name\": \"leads\". Got 'lead'." in result.exception


def test_shipped_suites_cover_contract():
    for table, contract in SOURCES.items():
        suite = json.loads((DEFAULT_SUITE_DIR / f"{table}.json").read_text())
        assert suite["name"] == table
        entries = suite["expectations"]
        checks = {(entry["type"], entry["kwargs"].get("column")) for entry in entries}
        for entry in entries:
            assert entry["meta"]["severity"] in ("critical", "warning")
        for column in contract.required_columns:
            assert ("expect_column_values_to_not_be_null", column) in checks, (table, column)
        for column in contract.timestamp_columns:
            assert ("expect_column_values_to_be_of_type", column) in checks, (table, column)
        for column in contract.key:
            assert ("expect_column_values_to_be_unique", column) in checks, (table, column)


def test_json_report_is_written(run, tmp_path):
    frames = make_frames()
    frames.invoices.loc[0, "currency"] = "XXX"

    report = run(frames)

    assert report.report_path == tmp_path / "reports" / "2024-05-01" / "validation.json"
    written = json.loads(report.report_path.read_text())
    assert written["success"] is False
    assert written["as_of"] == "2024-05-01"
    assert set(written["tables"]) == set(SOURCES)
    failing = [
        result for result in written["tables"]["invoices"]["results"] if not result["success"]
    ]
    assert [result["expectation"] for result in failing] == ["expect_column_values_to_be_in_set"]
    assert failing[0]["failing_count"] == 1
    assert failing[0]["examples"] == ["XXX"]


def test_summary_is_small_json(run):
    frames = make_frames()
    frames.invoices.loc[0, "currency"] = "XXX"
    frames.lead_events = frames.lead_events.iloc[0:0]

    summary = run(frames).summary()

    text = json.dumps(summary)
    assert len(text) < 2000
    assert summary["success"] is False
    assert summary["failed"] == 2
    assert summary["errored"] == 0
    assert summary["tables"]["invoices"]["failed"] == 1
    assert [failure["severity"] for failure in summary["failures"]] == ["critical", "warning"]


def test_failures_rejects_unknown_severity():
    report = ValidationReport(as_of=AS_OF, cutoff=CUTOFF, results={})

    with pytest.raises(ValueError, match="severity must be one of"):
        report.failures("fatal")


def test_task_logs_counts_and_warnings(settings, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(validate, "get_run_logger", lambda: logging.getLogger("test-validate"))
    frames = make_frames()
    frames.lead_events = frames.lead_events.iloc[0:0]

    with caplog.at_level(logging.INFO, logger="test-validate"):
        report = validate_sources_task.fn(frames, AS_OF, CUTOFF, settings, tmp_path)

    assert report.success
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [
        "validation warning: lead_events: expect_table_row_count_to_be_between failed "
        "(observed value: 0)"
    ]
    assert "invoices: 24 expectations evaluated, 0 failed, 0 errored" in caplog.text


def test_validation_opens_no_network_connection(run, monkeypatch):
    def fail_on_network_access(*args, **kwargs):
        raise AssertionError(f"unexpected network access: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", fail_on_network_access)
    monkeypatch.setattr(socket, "getaddrinfo", fail_on_network_access)
    monkeypatch.setattr(socket, "create_connection", fail_on_network_access)

    assert run(make_frames()).success
