"""Time simulate_company end to end and report seconds and rows per second per table.

Usage: python bench/bench_simulate.py --leads 1000000 --months 24 [--url URL]

Without --url the company goes to a SQLite file in a temporary folder that is deleted
afterwards. The report goes to standard output as a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np

from fulcrum.settings import redact_url
from fulcrum.simulate import SimulationSummary, simulate_company


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=1_000_000, help="number of leads to simulate")
    parser.add_argument("--months", type=int, default=24, help="months of lead arrivals")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--end",
        type=dt.date.fromisoformat,
        default=dt.date(2025, 6, 1),
        help="end date YYYY-MM-DD, exclusive (default 2025-06-01, fixed so runs compare)",
    )
    parser.add_argument(
        "--url", help="SQLAlchemy URL to write to; default: a temporary SQLite file"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=200_000, help="rows per write transaction"
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    return parser.parse_args(argv)


def format_report(summary: SimulationSummary, peak_mib: float) -> str:
    """Return the Markdown table of rows, seconds and rows per second per table."""
    lines = [
        "| table | rows | write seconds | rows/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, rows in summary.row_counts.items():
        seconds = summary.write_seconds[name]
        lines.append(f"| {name} | {rows:,} | {seconds:.1f} | {rows / seconds:,.0f} |")
    total_rows = sum(summary.row_counts.values())
    write_seconds = sum(summary.write_seconds.values())
    lines.append(
        f"| all tables | {total_rows:,} | {write_seconds:.1f} | {total_rows / write_seconds:,.0f} |"
    )
    lines += [
        "",
        f"Generating in memory: {summary.generate_seconds:.1f} s",
        f"Total: {summary.seconds:.1f} s ({total_rows / summary.seconds:,.0f} rows/s overall)",
        f"Peak resident memory: {peak_mib:,.0f} MiB",
        f"Customers: {summary.customers:,} ({summary.conversion_rate:.2%} of leads)",
    ]
    return "\n".join(lines)


def describe_machine() -> str:
    return (
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, SQLite {sqlite3.sqlite_version}"
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    with tempfile.TemporaryDirectory(prefix="fulcrum-bench-") as folder:
        url = arguments.url or f"sqlite:///{Path(folder) / 'warehouse.db'}"
        summary = simulate_company(
            url,
            leads=arguments.leads,
            months=arguments.months,
            seed=arguments.seed,
            end=arguments.end,
            chunk_rows=arguments.chunk_rows,
            progress=arguments.progress,
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{arguments.leads:,} leads over {arguments.months} months into {redact_url(url)}")
    print(describe_machine())
    print()
    print(format_report(summary, peak_mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
