"""Time the labels stage on a simulated company: the pandas path against the SQL path.

Usage: python bench/bench_labels.py --leads 100000 --months 24 [--url URL] [--repeats 3]

The pandas path reads billing_accounts and invoices with the extract functions and labels
them in pandas. The SQL path is label_accounts_in_warehouse, which sums the invoice lines in
the database. Both run at one cutoff, and the report gives the median seconds of each and
the rows that each reads into Python. Without --url the company goes to a SQLite file in a
temporary folder that is deleted afterwards. With --url the source tables at that URL are
replaced, so point it at a scratch database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fulcrum.contract import SOURCES
from fulcrum.settings import Settings, redact_url
from fulcrum.simulate import simulate_company
from fulcrum.sqltime import to_epoch_seconds
from fulcrum.warehouse import create_engine_for, read_only_connection
from tasks.extract import read_source_with_retries, restrict_to_cutoff
from tasks.labels import _label_accounts, _select_source, label_accounts_in_warehouse
from tasks.labels_sql import build_billing_queries

BILLING_SOURCES = ("billing_accounts", "invoices")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=100_000, help="number of leads to simulate")
    parser.add_argument("--months", type=int, default=24, help="months of lead arrivals")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--end",
        type=dt.date.fromisoformat,
        default=dt.date(2025, 6, 1),
        help="end date YYYY-MM-DD of the simulation and the cutoff (default 2025-06-01)",
    )
    parser.add_argument(
        "--url", help="SQLAlchemy URL of a scratch warehouse. Default: a temporary SQLite file"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    return parser.parse_args(argv)


def label_with_pandas(
    engine: sa.Engine, settings: Settings, cutoff: pd.Timestamp
) -> tuple[pd.DataFrame, int]:
    """Read both sources as the extract stage does and label them.

    Returns the labels and the number of source rows read into Python.
    """
    frames = {
        name: restrict_to_cutoff(
            read_source_with_retries(engine, name, settings, cutoff), SOURCES[name], cutoff
        )
        for name in BILLING_SOURCES
    }
    labels, _ = _label_accounts(
        frames["billing_accounts"], frames["invoices"], cutoff, settings.ltv
    )
    return labels, sum(len(frame) for frame in frames.values())


def count_sql_rows(engine: sa.Engine, settings: Settings, cutoff: pd.Timestamp) -> int:
    """Count the rows that the SQL path reads into Python: accounts, money, spells, problems."""
    queries = build_billing_queries(
        _select_source(engine, settings, "billing_accounts"),
        _select_source(engine, settings, "invoices"),
        settings.ltv.segment_column,
        to_epoch_seconds(cutoff),
    )
    with read_only_connection(engine) as connection:
        return len(connection.execute(queries.history).all())


def time_runs(run, repeats: int) -> tuple[float, object]:
    """Return the median seconds of ``repeats`` calls of ``run`` and the last call's result."""
    seconds = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def check_same_labels(sql_labels: pd.DataFrame, pandas_labels: pd.DataFrame) -> None:
    """Raise AssertionError unless both paths gave the same labels, floats to a relative 1e-9."""
    assert list(sql_labels["account_id"]) == list(pandas_labels["account_id"])
    for column in pandas_labels.columns:
        if pandas_labels[column].dtype == "float64":
            np.testing.assert_allclose(
                sql_labels[column], pandas_labels[column], rtol=1e-9, err_msg=column
            )
        else:
            assert sql_labels[column].tolist() == pandas_labels[column].tolist(), column


def describe_machine(engine: sa.Engine) -> str:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            database = connection.execute(sa.text("SHOW server_version")).scalar_one()
        database = f"PostgreSQL {database}"
    else:
        database = f"SQLite {sqlite3.sqlite_version}"
    return (
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"pandas {pd.__version__}, SQLAlchemy {sa.__version__}, {database}"
    )


def run_benchmark(url: str, arguments: argparse.Namespace) -> str:
    """Simulate the company at ``url``, time both paths and return the Markdown report."""
    summary = simulate_company(
        url, leads=arguments.leads, months=arguments.months, seed=arguments.seed, end=arguments.end
    )
    cutoff = pd.Timestamp(arguments.end, tz="UTC")
    settings = Settings(warehouse_url=url, extract_retry_delays_seconds=[])
    engine = create_engine_for(url)
    try:
        pandas_seconds, (pandas_labels, pandas_rows) = time_runs(
            lambda: label_with_pandas(engine, settings, cutoff), arguments.repeats
        )
        sql_seconds, (sql_labels, _) = time_runs(
            lambda: label_accounts_in_warehouse(engine, settings, cutoff), arguments.repeats
        )
        check_same_labels(sql_labels, pandas_labels)
        sql_rows = count_sql_rows(engine, settings, cutoff)
        machine = describe_machine(engine)
    finally:
        engine.dispose()

    return "\n".join(
        [
            f"{arguments.leads:,} leads over {arguments.months} months into {redact_url(url)}, "
            f"cutoff {cutoff.date()}: {summary.row_counts['invoices']:,} invoice lines, "
            f"{len(pandas_labels):,} accounts labelled",
            machine,
            "",
            f"| path | median seconds of {arguments.repeats} | rows read into Python |",
            "| --- | ---: | ---: |",
            f"| pandas (extract + label) | {pandas_seconds:.2f} | {pandas_rows:,} |",
            f"| SQL (label_accounts_in_warehouse) | {sql_seconds:.2f} | {sql_rows:,} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    with tempfile.TemporaryDirectory(prefix="fulcrum-bench-") as folder:
        url = arguments.url or f"sqlite:///{Path(folder) / 'warehouse.db'}"
        print(run_benchmark(url, arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
