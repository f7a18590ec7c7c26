"""Measure resident memory across a daily backfill, to show that it does not grow per date.

Usage: python bench/bench_backfill_memory.py --leads 50000 --dates 90 [--months 24] [--seed 0]

A simulated company is written to a SQLite warehouse in a temporary folder (by a separate
process, so that the simulator's memory is not counted). One Prefect flow then scores each
date in order, oldest first, as a ``backfill-date`` subflow run when flows/backfill.py
provides it, and as a ``nightly-scores`` run otherwise. The first date retrains both models
and the later ones score with the champions. After each date the script records the
process's resident set size (VmRSS from /proc/self/status) and its peak (getrusage).

The report goes to standard output as a Markdown table with the least-squares slope of RSS
against the date number, over all dates after the first and over the last two thirds. It
uses Prefect's temporary local API unless PREFECT_API_URL points at a server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)

MIB = 1024 * 1024


@dataclass
class DateMeasure:
    """Time, leads scored and memory after one date of the backfill."""

    number: int
    as_of: dt.date
    status: str
    seconds: float
    leads_scored: int
    rss_mib: float
    peak_mib: float


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=50_000, help="number of simulated leads")
    parser.add_argument("--months", type=int, default=24, help="months of lead arrivals")
    parser.add_argument("--dates", type=int, default=90, help="number of daily as-of dates")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the company")
    parser.add_argument(
        "--last-date",
        type=dt.date.fromisoformat,
        default=dt.date(2026, 6, 1),
        help="last as-of date YYYY-MM-DD (default 2026-06-01, fixed so runs compare)",
    )
    return parser.parse_args(argv)


def resident_mib() -> float:
    """Return the resident set size of this process in MiB (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line; this benchmark needs Linux")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def simulate(folder: Path, arguments: argparse.Namespace) -> str:
    """Write the company in a child process and return the warehouse URL."""
    url = f"sqlite:///{folder / 'warehouse.db'}"
    command = [
        sys.executable, "-m", "fulcrum.cli", "simulate",
        "--leads", str(arguments.leads),
        "--months", str(arguments.months),
        "--seed", str(arguments.seed),
        "--end", (arguments.last_date - dt.timedelta(days=1)).isoformat(),
        "--url", url,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return url


def configure(folder: Path, url: str) -> None:
    """Point the run settings at the temporary folder."""
    os.environ.pop("FULCRUM_CONFIG", None)
    os.environ["FULCRUM_WAREHOUSE_URL"] = url
    os.environ["FULCRUM_MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["FULCRUM_MLFLOW_ARTIFACT_LOCATION"] = str(folder / "mlartifacts")
    os.environ["FULCRUM_VAR_DIR"] = str(folder / "var")


def run_dates(dates: list[dt.date]) -> tuple[str, list[DateMeasure]]:
    """Score every date inside one parent flow run and measure memory after each."""
    from prefect import flow

    try:
        from flows.backfill import backfill_date as score_date

        runner = "backfill-date subflow runs (flows/backfill.py)"
    except ImportError:
        from flows.nightly import nightly_scores as score_date

        runner = "nightly-scores subflow runs (flows/backfill.py could not be imported)"

    @flow(name="bench-backfill-memory")
    def backfill_memory() -> list[DateMeasure]:
        measures = []
        for number, as_of in enumerate(dates, start=1):
            started = time.perf_counter()
            state = score_date(as_of=as_of, retrain=number == 1, return_state=True)
            seconds = time.perf_counter() - started
            result = state.result(raise_on_failure=False)
            leads = getattr(result, "leads_scored", 0) if state.is_completed() else 0
            measures.append(
                DateMeasure(
                    number, as_of, state.name, seconds, leads, resident_mib(), peak_mib()
                )
            )
            print(
                f"date {number:3d} {as_of} {state.name:<9} {seconds:6.1f} s "
                f"RSS {measures[-1].rss_mib:8.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
        return measures

    return runner, backfill_memory()


def slope(measures: list[DateMeasure]) -> float:
    """Least-squares slope of RSS against the date number, in MiB per date."""
    numbers = np.array([measure.number for measure in measures], dtype=float)
    rss = np.array([measure.rss_mib for measure in measures], dtype=float)
    return float(np.polyfit(numbers, rss, 1)[0])


def format_report(measures: list[DateMeasure]) -> str:
    lines = [
        "| date | as of | status | seconds | leads scored | RSS MiB | peak MiB |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for measure in measures:
        lines.append(
            f"| {measure.number} | {measure.as_of} | {measure.status} | {measure.seconds:.1f} | "
            f"{measure.leads_scored:,} | {measure.rss_mib:,.1f} | {measure.peak_mib:,.1f} |"
        )
    scoring = measures[1:]
    last_two_thirds = measures[len(measures) // 3 :]
    lines += [
        "",
        f"RSS after date 2: {scoring[0].rss_mib:,.1f} MiB; after the last date: "
        f"{measures[-1].rss_mib:,.1f} MiB; peak: {max(m.peak_mib for m in measures):,.1f} MiB",
        f"Slope of RSS over dates 2 to {len(measures)}: {slope(scoring):+.3f} MiB per date",
        f"Slope of RSS over dates {last_two_thirds[0].number} to {len(measures)}: "
        f"{slope(last_two_thirds):+.3f} MiB per date",
        f"Median seconds per date after the first: "
        f"{float(np.median([m.seconds for m in scoring])):.1f}",
    ]
    return "\n".join(lines)


def describe_machine() -> str:
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.dates < 3:
        raise SystemExit("--dates must be at least 3 to fit a slope after the first date")
    dates = [
        arguments.last_date - dt.timedelta(days=offset)
        for offset in range(arguments.dates - 1, -1, -1)
    ]
    with tempfile.TemporaryDirectory(prefix="fulcrum-bench-backfill-") as name:
        folder = Path(name)
        started = time.perf_counter()
        url = simulate(folder, arguments)
        simulate_seconds = time.perf_counter() - started
        configure(folder, url)
        runner, measures = run_dates(dates)

    print(
        f"{arguments.leads:,} simulated leads over {arguments.months} months (seed "
        f"{arguments.seed}), {len(dates)} daily dates from {dates[0]} to {dates[-1]}, "
        f"SQLite warehouse; simulated in {simulate_seconds:.0f} s"
    )
    print(f"Each date ran as {runner}; date 1 retrained both models, the others did not.")
    print(describe_machine())
    print()
    print(format_report(measures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
