"""Time the activity features computed in the warehouse against the pandas path.

Usage: python bench/bench_activity_features.py --leads 100000 [--url URL --schema NAME]

The script simulates a company, then times both ways of computing the activity features
of the scoring points (open leads at the cutoff) and of the training points (open leads
at each snapshot):

- pandas: read lead_events before the cutoff, choose the event types, run
  ``activity_features``;
- SQL: choose the event types with ``select_event_types_in_warehouse`` and run
  ``activity_features_in_warehouse``.

Both paths are checked to give the same features. Without --url the company goes to a
SQLite file in a temporary folder that is deleted afterwards. On PostgreSQL, pass --schema
so that the simulated tables replace nothing else. The report goes to standard output as
a Markdown table, with the minimum and the median of --repeats runs, and the peak of
memory that Python allocated (tracemalloc) in one more, untimed run of each path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fulcrum.contract import SOURCES
from fulcrum.settings import SOURCE_NAMES, Settings, redact_url
from fulcrum.simulate import simulate_company
from fulcrum.warehouse import create_engine_for
from tasks.extract import as_of_cutoff, extract_sources, read_source_with_retries, restrict_to_cutoff
from tasks.features import (
    activity_features,
    activity_features_in_warehouse,
    build_conversion_training_set,
    build_scoring_features,
    select_event_types,
    select_event_types_in_warehouse,
)

DAY_COLUMNS = ["days_since_last_event", "days_since_first_event"]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=100_000, help="number of leads to simulate")
    parser.add_argument("--months", type=int, default=12, help="months of lead arrivals")
    parser.add_argument("--seed", type=int, default=7, help="random seed")
    parser.add_argument(
        "--end",
        type=dt.date.fromisoformat,
        default=dt.date(2024, 7, 1),
        help="end date YYYY-MM-DD and as-of date of the features (default 2024-07-01)",
    )
    parser.add_argument(
        "--url", help="SQLAlchemy URL of the warehouse (default: a temporary SQLite file)"
    )
    parser.add_argument("--schema", help="PostgreSQL schema for the simulated tables")
    parser.add_argument(
        "--chunk-rows", type=int, default=100_000, help="points per temporary-table chunk"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    parser.add_argument(
        "--skip-simulation", action="store_true", help="reuse the company already at --url"
    )
    return parser.parse_args(argv)


def build_settings(url: str, schema: str | None, chunk_rows: int) -> Settings:
    sources = {name: {"table": name, "schema": schema} for name in SOURCE_NAMES}
    return Settings(warehouse_url=url, sources=sources, chunk_rows=chunk_rows)


def feature_points(settings: Settings, as_of: dt.date) -> dict[str, pd.DataFrame]:
    """Return the scoring and training points, built the way the nightly flow builds them."""
    frames = extract_sources(settings, as_of)
    cutoff = as_of_cutoff(as_of, settings.business_timezone)
    event_types = select_event_types(frames.lead_events)
    scoring = build_scoring_features(frames, cutoff, event_types).frame
    training = build_conversion_training_set(frames, cutoff, settings).frame
    return {
        "scoring": scoring[["lead_id", "feature_time"]],
        "training": training[["lead_id", "feature_time"]],
    }


def run_pandas_path(
    settings: Settings, cutoff: pd.Timestamp, points: dict[str, pd.DataFrame]
) -> tuple[dict[str, pd.DataFrame], int]:
    """Read the events and count them in pandas, returning the features and the events' bytes."""
    engine = create_engine_for(settings.warehouse_url.get_secret_value())
    try:
        raw = read_source_with_retries(engine, "lead_events", settings, cutoff)
    finally:
        engine.dispose()
    events = restrict_to_cutoff(raw, SOURCES["lead_events"], cutoff)
    event_types = select_event_types(events)
    features = {name: activity_features(events, frame, event_types) for name, frame in points.items()}
    return features, int(events.memory_usage(deep=True).sum())


def run_sql_path(
    settings: Settings, cutoff: pd.Timestamp, points: dict[str, pd.DataFrame]
) -> dict[str, pd.DataFrame]:
    """Choose the event types and count the events in the warehouse."""
    engine = create_engine_for(settings.warehouse_url.get_secret_value())
    try:
        with engine.connect() as connection:
            event_types = select_event_types_in_warehouse(connection, settings, cutoff)
            features = {
                name: activity_features_in_warehouse(connection, settings, frame, event_types, cutoff)
                for name, frame in points.items()
            }
            connection.rollback()
    finally:
        engine.dispose()
    return features


def time_runs(run: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def peak_allocated_bytes(run: Callable[[], object]) -> int:
    """Return the peak of the memory Python allocates during ``run``, as traced by tracemalloc."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_same_features(sql: dict[str, pd.DataFrame], reference: dict[str, pd.DataFrame]) -> None:
    """Raise AssertionError when the two paths disagree: counts exactly, ages within 1e-9."""
    for name, expected in reference.items():
        actual = sql[name]
        counts = [column for column in expected.columns if column not in DAY_COLUMNS]
        pd.testing.assert_frame_equal(actual[counts], expected[counts], check_exact=True, obj=name)
        pd.testing.assert_frame_equal(
            actual[DAY_COLUMNS], expected[DAY_COLUMNS], check_exact=False, rtol=1e-9, obj=name
        )


def format_report(
    timings: dict[str, list[float]],
    peaks: dict[str, int],
    points: dict[str, pd.DataFrame],
    events_bytes: int,
) -> str:
    """Return the Markdown table of seconds and peak memory per path, and the sizes behind them."""
    lines = [
        "| path | min seconds | median seconds | peak Python memory (MiB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in timings.items():
        lines.append(
            f"| {name} | {min(seconds):.2f} | {statistics.median(seconds):.2f} "
            f"| {peaks[name] / 2**20:,.0f} |"
        )
    sizes = ", ".join(
        f"{name} {len(frame):,} ({frame['feature_time'].nunique()} feature times)"
        for name, frame in points.items()
    )
    lines += [
        "",
        f"Points: {sizes}",
        f"lead_events before the cutoff, as read by the pandas path: {events_bytes / 2**20:,.1f} MiB",
    ]
    return "\n".join(lines)


def describe_machine() -> str:
    return (
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"pandas {pd.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = arguments.url or f"sqlite:///{Path(folder) / 'warehouse.db'}"
        if not arguments.skip_simulation:
            summary = simulate_company(
                url, leads=arguments.leads, months=arguments.months, seed=arguments.seed,
                end=arguments.end, schema=arguments.schema,
            )
            print(summary.describe(), file=sys.stderr)
        settings = build_settings(url, arguments.schema, arguments.chunk_rows)
        cutoff = as_of_cutoff(arguments.end, settings.business_timezone)
        points = feature_points(settings, arguments.end)

        paths = {
            "pandas: read lead_events + features": lambda: run_pandas_path(settings, cutoff, points),
            "SQL: features in the warehouse": lambda: run_sql_path(settings, cutoff, points),
        }
        timings, results = {}, {}
        for name, run in paths.items():
            timings[name], results[name] = time_runs(run, arguments.repeats)
        peaks = {name: peak_allocated_bytes(run) for name, run in paths.items()}
        reference, events_bytes = results["pandas: read lead_events + features"]
        check_same_features(results["SQL: features in the warehouse"], reference)

    print(f"Activity features of {arguments.leads:,} simulated leads in {redact_url(url)}")
    print(f"Machine: {describe_machine()}")
    print()
    print(format_report(timings, peaks, points, events_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
