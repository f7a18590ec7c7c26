"""Validate: run the Great Expectations suites and cross-table checks on the extracted sources.

Each source has a suite file ``expectations/<source>.json``. An entry names a GX Core 1.x
expectation, its kwargs and, in ``meta``, a ``severity`` of ``critical`` or ``warning``. A
kwarg written as ``{"$PARAMETER": "<name>"}`` is a placeholder that GX fills in with the
run's value of that name (see :func:`build_run_parameters`). Cross-table checks that GX
cannot express on one DataFrame run in pandas and are reported in the same form.

docs/validation.md describes the suites, placeholders and report files for people.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations import exceptions as gx_exceptions
from great_expectations.compatibility import pydantic as gx_pydantic
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
from great_expectations.expectations.row_conditions import deserialize_row_condition
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fulcrum.timing import measured
from fulcrum.contract import INVOICE_KINDS, SOURCES, SourceContract
from fulcrum.settings import Settings
from tasks.extract import SourceFrames

SEVERITIES = ("critical", "warning")
DEFAULT_SUITE_DIR = Path(__file__).resolve().parents[1] / "expectations"
DATASOURCE_NAME = "fulcrum_sources"
EXAMPLE_COUNT = 5
EXAMPLE_MAX_CHARS = 60
PLACEHOLDER_KEY = "$PARAMETER"

# BASIC keeps the unexpected count and the first unexpected values. SUMMARY also counts
# every distinct unexpected value and COMPLETE lists them all. Two failing expectations on a
# million rows took 1.4 s with BASIC, 1.9 s with SUMMARY and 3.5 s with COMPLETE. The first
# 20 values are requested so that repeated values still leave EXAMPLE_COUNT distinct examples.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 20}

_SUITE_ENTRY_KEYS = {"type", "kwargs", "meta", "notes"}
# Rule names of the results that report a problem with the suite itself, not with the data.
_SUITE_RULES = ("suite_file", "expectations_evaluated")
_NUMERIC_KINDS = ("float", "integer")


class DataValidationError(RuntimeError):
    """Raised when a validation report contains critical failures."""

    def __init__(self, message: str, failures: list[ExpectationResult], report_path: Path | None):
        super().__init__(message)
        self.failures = failures
        self.report_path = report_path


class SuiteFileError(ValueError):
    """Raised when a suite file cannot be read or has the wrong shape."""


@dataclass
class ExpectationResult:
    """The outcome of one expectation or cross-table check on one source."""

    table: str
    expectation: str
    severity: str
    success: bool
    evaluated: bool
    columns: list[str] = field(default_factory=list)
    condition: str | None = None
    element_count: int | None = None
    failing_count: int | None = None
    examples: list[Any] = field(default_factory=list)
    observed_value: Any = None
    details: Any = None
    exception: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None

    @property
    def errored(self) -> bool:
        return not self.evaluated

    @property
    def location(self) -> str:
        """The table and columns the result is about, for example ``invoices.amount``."""
        if not self.columns:
            return self.table
        if len(self.columns) == 1:
            return f"{self.table}.{self.columns[0]}"
        return f"{self.table}.({', '.join(self.columns)})"

    def describe(self) -> str:
        """Return one line naming the location, the rule and what was found."""
        subject = self.location
        if self.condition:
            subject += f" where {self.condition}"

        if self.errored and self.expectation in _SUITE_RULES:
            return f"{subject}: {self.exception}"
        if self.errored:
            exception = (self.exception or "").rstrip(".")
            return f"{subject}: {self.expectation} raised an exception: {exception}"
        if self.success:
            return f"{subject}: {self.expectation} passed"
        if self.failing_count is not None:
            text = f"{subject}: {self.expectation} failed for {self.failing_count:,}"
            if self.element_count is not None:
                text += f" of {self.element_count:,}"
            text += " rows"
            if any(value is not None for value in self.examples):
                text += f" (examples: {', '.join(_format_example(v) for v in self.examples)})"
            if self.hint:
                text += f". {self.hint}"
            return text
        text = f"{subject}: {self.expectation} failed (observed value: {self.observed_value!r}"
        if self.details:
            text += f"; details: {self.details!r}"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "columns": self.columns,
            "expectation": self.expectation,
            "severity": self.severity,
            "success": self.success,
            "evaluated": self.evaluated,
            "condition": self.condition,
            "element_count": self.element_count,
            "failing_count": self.failing_count,
            "examples": self.examples,
            "observed_value": self.observed_value,
            "details": self.details,
            "exception": self.exception,
            "kwargs": self.kwargs,
            "hint": self.hint,
            "message": None if self.success else self.describe(),
        }


@dataclass
class ValidationReport:
    """Every expectation result of one run, by source, and where the full JSON was written."""

    as_of: datetime.date
    cutoff: pd.Timestamp
    results: dict[str, list[ExpectationResult]]
    report_path: Path | None = None

    @property
    def success(self) -> bool:
        """True when at least one expectation was evaluated and no critical one failed."""
        return self.evaluated_count > 0 and not self.failures("critical")

    @property
    def evaluated_count(self) -> int:
        return sum(result.evaluated for result in self._all_results())

    def failures(self, severity: str | None = "critical") -> list[ExpectationResult]:
        """Return the unsuccessful results of one severity, or of every severity for None."""
        if severity is not None and severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES} or None. Got {severity!r}.")
        return [
            result
            for result in self._all_results()
            if not result.success and (severity is None or result.severity == severity)
        ]

    def table_counts(self) -> dict[str, dict[str, int]]:
        """Return, per source, how many expectations were evaluated, failed and errored."""
        return {
            table: {
                "evaluated": sum(result.evaluated for result in results),
                "failed": sum(result.evaluated and not result.success for result in results),
                "errored": sum(result.errored for result in results),
            }
            for table, results in self.results.items()
        }

    def summary(self, max_failures: int = 20) -> dict[str, Any]:
        """Return counts per source and the first failures, small enough for score_runs."""
        table_counts = self.table_counts()
        failures = sorted(self.failures(None), key=lambda result: result.severity != "critical")
        listed = [
            {
                "table": result.table,
                "columns": result.columns,
                "expectation": result.expectation,
                "severity": result.severity,
                "failing_count": result.failing_count,
                "message": _truncate(result.describe(), 300),
            }
            for result in failures[:max_failures]
        ]
        return {
            "success": self.success,
            "as_of": self.as_of.isoformat(),
            "evaluated": sum(counts["evaluated"] for counts in table_counts.values()),
            "failed": sum(counts["failed"] for counts in table_counts.values()),
            "errored": sum(counts["errored"] for counts in table_counts.values()),
            "tables": table_counts,
            "failures": listed,
            "failures_not_listed": len(failures) - len(listed),
            "report_path": None if self.report_path is None else str(self.report_path),
        }

    def raise_for_failures(self) -> None:
        """Raise DataValidationError naming every critical failure, if there is any."""
        if self.success:
            return
        critical = self.failures("critical")
        if critical:
            details = "; ".join(result.describe() for result in critical)
            message = f"data validation found {len(critical)} critical failures: {details}"
        else:
            message = "data validation evaluated no expectations. Check the suite files"
        if self.report_path is not None:
            message += f". Full results: {self.report_path}"
        raise DataValidationError(message, critical, self.report_path)

    def to_dict(self) -> dict[str, Any]:
        table_counts = self.table_counts()
        return {
            "as_of": self.as_of.isoformat(),
            "cutoff": self.cutoff.isoformat(),
            "success": self.success,
            "tables": {
                table: {**table_counts[table], "results": [r.to_dict() for r in results]}
                for table, results in self.results.items()
            },
        }

    def _all_results(self) -> Iterable[ExpectationResult]:
        for results in self.results.values():
            yield from results


def build_run_parameters(cutoff: pd.Timestamp, settings: Settings) -> dict[str, Any]:
    """Return the values that fill the ``{"$PARAMETER": name}`` placeholders of the suites.

    ``cutoff`` and ``freshness_bound`` are UTC-aware timestamps. The bound is the earliest
    allowed newest ``leads.created_at``, ``freshness_days`` before the cutoff.
    """
    return {
        "cutoff": cutoff,
        "freshness_bound": cutoff - pd.Timedelta(days=settings.freshness_days),
        "currencies": list(settings.currencies),
        "invoice_kinds": list(INVOICE_KINDS),
    }


def read_suite_file(path: Path, table: str) -> list[dict[str, Any]]:
    """Return the expectation entries of one suite file, raising SuiteFileError if unusable."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SuiteFileError(f"suite file {path} is not valid JSON: {exc}") from exc

    if not isinstance(document, dict) or not isinstance(document.get("expectations"), list):
        raise SuiteFileError(
            f'suite file {path} must be a JSON object with an "expectations" list'
        )
    if document.get("name") != table:
        raise SuiteFileError(
            f'suite file {path} must have "name": "{table}". Got {document.get("name")!r}.'
        )
    return document["expectations"]


def build_expectation(entry: Any, parameter_names: Iterable[str]) -> gx.expectations.Expectation:
    """Turn one suite entry into a GX expectation, raising ValueError if it is invalid."""
    if not isinstance(entry, dict):
        raise ValueError(f"an expectation entry must be a JSON object. Got {entry!r}.")
    unknown_keys = sorted(set(entry) - _SUITE_ENTRY_KEYS)
    if unknown_keys:
        raise ValueError(
            f"unknown keys {unknown_keys}. Allowed keys are {sorted(_SUITE_ENTRY_KEYS)}, "
            "and severity belongs in meta."
        )
    if not isinstance(entry.get("type"), str) or not isinstance(entry.get("kwargs"), dict):
        raise ValueError('an expectation entry needs a string "type" and a "kwargs" object')

    meta = entry.get("meta") or {}
    severity = meta.get("severity") if isinstance(meta, dict) else None
    if severity not in SEVERITIES:
        raise ValueError(f"meta.severity must be one of {SEVERITIES}. Got {severity!r}.")

    check_placeholders(entry["kwargs"], parameter_names)

    configuration = ExpectationConfiguration(
        type=entry["type"],
        kwargs=entry["kwargs"],
        meta=meta,
        notes=entry.get("notes"),
        severity=severity,
    )
    try:
        return configuration.to_domain_obj()
    except (gx_exceptions.GreatExpectationsError, gx_pydantic.ValidationError) as exc:
        raise ValueError(str(exc)) from exc


def check_placeholders(kwargs: dict[str, Any], parameter_names: Iterable[str]) -> None:
    """Raise ValueError for a placeholder with an unknown name or one that GX would not fill in.

    GX substitutes a placeholder only when it is the whole value of a kwarg, so one inside a
    list or a row_condition would reach the expectation as a literal dict.
    """
    known = sorted(parameter_names)
    for key, value in kwargs.items():
        if _is_placeholder(value):
            if value[PLACEHOLDER_KEY] not in known:
                raise ValueError(
                    f"kwarg {key!r} has the unknown placeholder {value[PLACEHOLDER_KEY]!r}. "
                    f"Known placeholders are {known}."
                )
        elif _contains_placeholder(value):
            raise ValueError(
                f"kwarg {key!r} has a placeholder inside it, but a placeholder must be the "
                "whole value of a kwarg"
            )


def prepare_frame(frame: pd.DataFrame, contract: SourceContract) -> pd.DataFrame:
    """Return the frame with text columns that should be numbers or timestamps made ``object``.

    GX checks the values of an ``object`` column one by one and lists the ones of the wrong
    type, but it judges any other dtype as a whole. Without this step a text ``amount``
    column would fail without naming a single offending value.
    """
    text_columns = [
        column.name
        for column in contract.columns
        if column.kind in (*_NUMERIC_KINDS, "timestamp")
        and column.name in frame.columns
        and pd.api.types.is_string_dtype(frame[column.name].dtype)
        and frame[column.name].dtype != object
    ]
    if not text_columns:
        return frame
    return frame.astype({name: object for name in text_columns})


def create_context() -> gx.data_context.EphemeralDataContext:
    """Create an in-memory GX context with one pandas datasource, analytics and progress bars off.

    Analytics are switched off here as well as by ``GX_ANALYTICS_ENABLED=false``, so they stay
    off in a process where that variable is not set.
    """
    context = gx.get_context(mode="ephemeral")
    context.enable_analytics(False)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas(DATASOURCE_NAME)
    return context


def run_suite(
    context: gx.data_context.AbstractDataContext,
    table: str,
    frame: pd.DataFrame,
    expectations: list[gx.expectations.Expectation],
    parameters: Mapping[str, Any],
) -> list[ExpectationResult]:
    """Validate one DataFrame against its expectations, in suite order."""
    asset = context.data_sources.get(DATASOURCE_NAME).add_dataframe_asset(name=table)
    batch_definition = asset.add_batch_definition_whole_dataframe(name=table)
    suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
    validation = gx.ValidationDefinition(name=table, data=batch_definition, suite=suite)

    suite_result = validation.run(
        batch_parameters={"dataframe": frame},
        expectation_parameters=dict(parameters),
        result_format=RESULT_FORMAT,
    )

    position = {expectation.id: index for index, expectation in enumerate(suite.expectations)}
    ordered = sorted(
        suite_result.results, key=lambda result: position.get(result.expectation_config.id, 0)
    )
    return [convert_result(table, result) for result in ordered]


def convert_result(table: str, result: ExpectationValidationResult) -> ExpectationResult:
    """Convert a GX result into an ExpectationResult. A result that raised is critical."""
    configuration = result.expectation_config
    kwargs = {key: value for key, value in configuration.kwargs.items() if key != "batch_id"}
    details = result.result or {}
    exception = _exception_message(result.exception_info)

    columns = [kwargs[key] for key in ("column", "column_A", "column_B") if key in kwargs]
    columns += list(kwargs.get("column_list") or [])
    condition = None
    if kwargs.get("row_condition"):
        condition = repr(deserialize_row_condition(kwargs["row_condition"]))

    return ExpectationResult(
        table=table,
        expectation=configuration.type,
        # An expectation that raised did not check anything, whatever its severity.
        severity="critical" if exception else configuration.meta["severity"],
        success=bool(result.success) and exception is None,
        evaluated=exception is None,
        columns=columns,
        condition=condition,
        element_count=details.get("element_count"),
        failing_count=details.get("unexpected_count"),
        examples=_distinct(_to_json_value(details.get("partial_unexpected_list") or []))[
            :EXAMPLE_COUNT
        ],
        observed_value=_to_json_value(details.get("observed_value")),
        details=_to_json_value(details.get("details")),
        exception=exception,
        kwargs=_to_json_value(kwargs),
    )


def validate_table(
    context: gx.data_context.AbstractDataContext,
    table: str,
    frame: pd.DataFrame,
    suite_path: Path,
    parameters: Mapping[str, Any],
) -> list[ExpectationResult]:
    """Run the suite file of one source. Unusable entries are reported as critical errors."""
    if not suite_path.is_file():
        return [_suite_error(table, "suite_file", f"suite file {suite_path} not found")]
    try:
        entries = read_suite_file(suite_path, table)
    except (OSError, SuiteFileError) as exc:
        return [_suite_error(table, "suite_file", str(exc))]
    if not entries:
        message = f"suite file {suite_path} has no expectations, so nothing was checked"
        return [_suite_error(table, "expectations_evaluated", message)]

    expectations = []
    results = []
    for index, entry in enumerate(entries):
        try:
            expectations.append(build_expectation(entry, parameters))
        except ValueError as exc:
            entry_type = entry.get("type") if isinstance(entry, dict) else None
            message = f"entry {index} ({entry_type}) of {suite_path.name} is invalid: {exc}"
            results.append(_suite_error(table, "suite_file", message))

    if expectations:
        prepared_frame = prepare_frame(frame, SOURCES[table])
        results += run_suite(context, table, prepared_frame, expectations, parameters)
    return results


@dataclass(frozen=True)
class Reference:
    """A cross-table rule that every id in ``table.column`` exists in ``target.target_column``.

    With ``won_only`` only won opportunities are checked, and a NULL id fails as well.
    Otherwise NULL ids pass, because the NOT NULL expectations already report them.
    """

    rule: str
    table: str
    column: str
    target: str
    target_column: str
    severity: str
    won_only: bool = False


REFERENCES = (
    Reference(
        "lead_event_lead_exists", "lead_events", "lead_id", "leads", "lead_id", "warning"
    ),
    Reference(
        "opportunity_lead_exists", "opportunities", "lead_id", "leads", "lead_id", "critical"
    ),
    # A won opportunity without a known account gets no LTV label, which the run can survive.
    Reference(
        "won_opportunity_account_exists", "opportunities", "account_id",
        "billing_accounts", "account_id", "warning", won_only=True,
    ),
    Reference(
        "invoice_account_exists", "invoices", "account_id", "billing_accounts", "account_id",
        "critical",
    ),
)


def check_reference(frames: SourceFrames, reference: Reference) -> ExpectationResult:
    """Check one cross-table rule. A missing column or an unreadable ``won`` is critical."""
    sources = dict(frames.items())
    result = ExpectationResult(
        table=reference.table,
        expectation=reference.rule,
        severity=reference.severity,
        success=False,
        evaluated=False,
        columns=[reference.column],
        condition="won == True" if reference.won_only else None,
        kwargs={"references": f"{reference.target}.{reference.target_column}"},
    )

    try:
        frame = sources[reference.table]
        known_ids = sources[reference.target][reference.target_column].dropna()
        if reference.won_only:
            won = frame["won"].astype("boolean").fillna(False).to_numpy(dtype=bool)
            frame = frame[won]
        ids = frame[reference.column]
        # isin on pandas 3's Arrow-backed str dtype took 11 s for one million ids against one
        # million, and 1 s after converting both sides to object (pandas 3.1, pyarrow 25,
        # 2-core machine).
        missing = ~ids.astype(object).isin(known_ids.astype(object))
        if not reference.won_only:
            missing &= ids.notna()
    except (KeyError, TypeError, ValueError) as exc:
        result.severity = "critical"
        result.exception = f"{type(exc).__name__}: {exc}"
        return result

    result.evaluated = True
    result.element_count = len(ids)
    result.failing_count = int(missing.sum())
    result.success = result.failing_count == 0
    examples = ids[missing].drop_duplicates().head(EXAMPLE_COUNT)
    result.examples = _to_json_value(examples.tolist())
    return result


def check_single_currency(frames: SourceFrames, allow_mixed: bool) -> ExpectationResult:
    """Check that the billing accounts share one currency.

    Fulcrum converts no currency, so LTVs in two currencies cannot be ranked against each
    other. The rows outside the most common currency fail. The rule is critical unless
    ``allow_mixed`` (settings.allow_mixed_currencies) makes it a warning.
    """
    currencies = frames.billing_accounts["currency"].dropna().astype(str)
    # Most accounts first, and ties in alphabetical order, so the examples do not vary by run.
    counts = currencies.value_counts().sort_index().sort_values(ascending=False, kind="stable")
    minority = counts.iloc[1:]

    result = ExpectationResult(
        table="billing_accounts",
        expectation="accounts_share_one_currency",
        severity="warning" if allow_mixed else "critical",
        success=minority.empty,
        evaluated=True,
        columns=["currency"],
        element_count=len(currencies),
        failing_count=int(minority.sum()),
        examples=[str(code) for code in minority.index[:EXAMPLE_COUNT]],
        observed_value={str(code): int(count) for code, count in counts.items()},
    )
    if minority.empty:
        return result

    listed = ", ".join(f"{code} {count:,}" for code, count in counts.items())
    if allow_mixed:
        result.hint = (
            f"Accounts are billed in {len(counts)} currencies ({listed}). "
            "allow_mixed_currencies is set, so LTVs in different currencies are ranked together"
        )
    else:
        result.hint = (
            f"Accounts are billed in {len(counts)} currencies ({listed}), and Fulcrum converts "
            "none, so their LTVs cannot be ranked together. Convert the amounts to one "
            "currency in the source mappings, or set allow_mixed_currencies = true"
        )
    return result


def write_report(report: ValidationReport, report_dir: Path) -> Path:
    """Write the full results to ``report_dir/<as_of>/validation.json`` and return the path.

    The file is written next to its final name and then renamed, so a reader never sees
    half a report. A second run for the same as_of replaces the file.
    """
    path = Path(report_dir) / report.as_of.isoformat() / "validation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
    temporary.replace(path)
    return path


def validate_sources(
    frames: SourceFrames,
    as_of: datetime.date,
    cutoff: pd.Timestamp,
    settings: Settings,
    report_dir: Path,
    *,
    suite_dir: Path | None = None,
) -> ValidationReport:
    """Validate the five sources against their suites and each other, and write the report.

    ``suite_dir`` defaults to the repository's ``expectations/`` folder. The report is
    returned whatever it found: call ``raise_for_failures()`` to stop on critical failures.
    """
    cutoff = pd.Timestamp(cutoff)
    if cutoff.tzinfo is None:
        raise ValueError(f"cutoff must be a timezone-aware timestamp. Got {cutoff!r}.")
    suite_dir = DEFAULT_SUITE_DIR if suite_dir is None else Path(suite_dir)
    parameters = build_run_parameters(cutoff, settings)
    context = create_context()

    absent = {name for name, spec in settings.sources.items() if spec.absent}
    results = {
        table: validate_table(context, table, frame, suite_dir / f"{table}.json", parameters)
        for table, frame in frames.items()
        if table not in absent
    }
    for reference in REFERENCES:
        # A rule that reaches into a source the warehouse does not have cannot be checked.
        if reference.table in absent or reference.target in absent:
            continue
        results[reference.table].append(check_reference(frames, reference))
    if "billing_accounts" not in absent:
        results["billing_accounts"].append(
            check_single_currency(frames, settings.allow_mixed_currencies)
        )

    report = ValidationReport(as_of=as_of, cutoff=cutoff, results=results)
    report.report_path = write_report(report, report_dir)
    return report


def _suite_error(table: str, rule: str, message: str) -> ExpectationResult:
    return ExpectationResult(
        table=table, expectation=rule, severity="critical", success=False, evaluated=False,
        exception=message,
    )


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, dict) and PLACEHOLDER_KEY in value


def _contains_placeholder(value: Any) -> bool:
    if _is_placeholder(value):
        return True
    if isinstance(value, dict):
        return any(_contains_placeholder(item) for item in value.values())
    if isinstance(value, list):
        return any(_contains_placeholder(item) for item in value)
    return False


def _exception_message(exception_info: Any) -> str | None:
    """Return the first exception message in GX's exception_info, or None if none was raised.

    GX stores either one flat record or one record per metric that failed to compute.
    """
    if not exception_info:
        return None
    records = [exception_info] if "raised_exception" in exception_info else exception_info.values()
    for record in records:
        if isinstance(record, dict) and record.get("raised_exception"):
            return record.get("exception_message") or "unknown error"
    return None


def _to_json_value(value: Any) -> Any:
    """Return ``value`` as strict JSON data: timestamps as ISO text, NaN and NaT as None."""
    if isinstance(value, dict):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, np.ndarray, pd.Series)):
        return [_to_json_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, (pd.Timestamp, datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value)


def _distinct(values: list[Any]) -> list[Any]:
    distinct = []
    for value in values:
        if value not in distinct:
            distinct.append(value)
    return distinct


def _format_example(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str) and len(value) > EXAMPLE_MAX_CHARS:
        # A 10,000-character id would otherwise fill the message, the log line and score_runs.
        return f"{value[:EXAMPLE_MAX_CHARS]!r}... ({len(value):,} characters)"
    return repr(value)


def _truncate(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 3] + "..."


@task(name="validate-sources", cache_policy=NO_CACHE)
@measured
def validate_sources_task(
    frames: SourceFrames,
    as_of: datetime.date,
    cutoff: pd.Timestamp,
    settings: Settings,
    report_dir: Path,
) -> ValidationReport:
    """Validate the sources and log the counts. The flow decides whether to raise."""
    logger = get_run_logger()
    report = validate_sources(frames, as_of, cutoff, settings, report_dir)

    for table, counts in report.table_counts().items():
        logger.info(
            "%s: %d expectations evaluated, %d failed, %d errored",
            table, counts["evaluated"], counts["failed"], counts["errored"],
        )
    for result in report.failures("warning"):
        logger.warning("validation warning: %s", result.describe())
    for result in report.failures("critical"):
        logger.error("validation failure: %s", result.describe())
    logger.info(
        "validation %s with %d expectations evaluated. Full results: %s",
        "passed" if report.success else "failed", report.evaluated_count, report.report_path,
    )
    return report
