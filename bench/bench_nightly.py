"""Time the nightly flow end to end on simulated companies, per stage, on SQLite and PostgreSQL.

Usage:
    python bench/bench_nightly.py --leads 100000 1000000 --backend sqlite postgresql

For each size and backend, a separate process simulates a company into a new warehouse, so
that the simulator's memory is not counted. The warehouse is a SQLite file in a temporary
folder, or a new PostgreSQL database created through --postgres-url and dropped at the end.
Its new tables are vacuumed and analysed. A fresh process then runs the nightly-scores flow
once, as of the day after the simulated period: extract, validate, labels, features, training
of both models, scoring and publishing. Before timing, it runs an empty flow, so that
Prefect's local API server is up and imported.

Printed per run:
- each stage's wall time, rows per second and the peak resident memory at its end;
- the flow's wall time and the peak resident memory of its process;
- the time outside Fulcrum's own stage code: Prefect's task and flow engines, its API calls
  and the bookkeeping that is not measured;
- the throughput of the publish-scores task against a raw write of the same rows into tables
  without a key (COPY on PostgreSQL, executemany on SQLite), timed right after the flow.

--json writes every figure to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "TQDM_DISABLE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_key, _value)

REPOSITORY = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

STAGES = ["extract", "validate", "labels", "features", "train", "score", "publish"]
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the nightly flow per stage on simulated companies.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--leads", type=int, nargs="+", default=[100_000], help="company sizes in leads (default 100000)"
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgresql"],
        nargs="+",
        default=["sqlite", "postgresql"],
        help="warehouses to run on (default both)",
    )
    parser.add_argument("--months", type=int, default=24, help="months of lead arrivals (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the company (default 0)")
    parser.add_argument(
        "--end",
        type=dt.date.fromisoformat,
        default=dt.date(2026, 6, 1),
        help="first day after the simulated period, and the run's as-of date (default 2026-06-01)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("FULCRUM_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="URL of a PostgreSQL database whose user may create databases; each run gets a new "
        "database next to it (default FULCRUM_TEST_POSTGRES_URL or the local server)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", nargs=3, metavar=("URL", "FOLDER", "AS_OF"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def configure(folder: Path, url: str) -> None:
    """Point the run settings at the benchmark's folder and warehouse."""
    os.environ.pop("FULCRUM_CONFIG", None)
    os.environ["FULCRUM_WAREHOUSE_URL"] = url
    os.environ["FULCRUM_MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["FULCRUM_MLFLOW_ARTIFACT_LOCATION"] = str(folder / "mlartifacts")
    os.environ["FULCRUM_VAR_DIR"] = str(folder / "var")


def run_child(url: str, folder: Path, as_of: dt.date) -> dict:
    """Run the nightly flow once in this process and return its figures."""
    configure(folder, url)
    from prefect import flow

    from flows.nightly import nightly_scores, peak_resident_mib
    from fulcrum.timing import measured_seconds, reset_measured_seconds

    @flow(name="bench-warm-up")
    def warm_up() -> None:
        return None

    started = time.perf_counter()
    warm_up()
    warm_up_seconds = time.perf_counter() - started
    baseline_mib = peak_resident_mib()

    reset_measured_seconds()
    started = time.perf_counter()
    result = nightly_scores(as_of=as_of)
    flow_seconds = time.perf_counter() - started
    own_seconds = sum(measured_seconds().values())
    figures = {
        "warm_up_seconds": warm_up_seconds,
        "flow_seconds": flow_seconds,
        "own_code_seconds": own_seconds,
        "orchestration_seconds": flow_seconds - own_seconds,
        "stage_seconds": result.stage_seconds,
        "stage_rows": result.stage_rows,
        "stage_peak_mib": result.stage_peak_mib,
        "rows_published": result.rows_published,
        "leads_scored": result.leads_scored,
        "peak_mib_before_flow": baseline_mib,
        "peak_mib": peak_resident_mib(),
        "metrics": result.metrics,
    }
    figures["publish_task_seconds"] = measured_seconds().get("tasks.publish.publish_scores_task")
    figures["raw_copy"] = time_raw_copy(as_of)
    return figures


PUBLISHED_TABLES = ("lead_scores", "account_ltv", "volume_value_frontier")


def time_raw_copy(as_of: dt.date) -> dict:
    """Time a raw write of every row the run published into tables without a key.

    The rows of the three per-date tables are read back. Each table's rows are then written
    in one go by bench/bench_publish.py's ``time_raw_write``.
    """
    import pandas as pd
    import sqlalchemy as sa

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_publish import time_raw_write

    from fulcrum.settings import load_settings
    from fulcrum.warehouse import Warehouse

    warehouse = Warehouse.from_settings(load_settings())
    rows, seconds = 0, 0.0
    try:
        for name in PUBLISHED_TABLES:
            source = warehouse.outputs[name]
            with warehouse.engine.connect() as connection:
                query = sa.select(source).where(source.c.as_of == as_of)
                frame = pd.read_sql_query(query, connection)
            seconds += time_raw_write(warehouse, source, frame)
            rows += len(frame)
        return {"rows": rows, "seconds": seconds}
    finally:
        warehouse.engine.dispose()


def create_postgres_database(admin_url: str) -> tuple[str, str]:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"fulcrum_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False), name


def drop_postgres_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


def simulate(url: str, leads: int, arguments: argparse.Namespace) -> float:
    """Write the company in a child process and return the seconds it took."""
    command = [
        sys.executable, "-m", "fulcrum.cli", "simulate",
        "--leads", str(leads),
        "--months", str(arguments.months),
        "--seed", str(arguments.seed),
        "--end", arguments.end.isoformat(),
        "--url", url,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPOSITORY)
    seconds = time.perf_counter() - started
    settle(url)
    return seconds


def settle(url: str) -> None:
    """Vacuum and analyse the freshly written tables, as a warehouse in daily use would be.

    Without this, PostgreSQL's autovacuum processes the millions of new rows while the flow
    runs, and the timings measure that as well.
    """
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("VACUUM ANALYZE" if url.startswith("postgresql") else "ANALYZE")
    finally:
        engine.dispose()


def run_case(leads: int, backend: str, arguments: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fulcrum-bench-nightly-") as name:
        folder = Path(name)
        database = None
        if backend == "sqlite":
            url = f"sqlite:///{folder / 'warehouse.db'}"
        else:
            url, database = create_postgres_database(arguments.postgres_url)
        try:
            simulate_seconds = simulate(url, leads, arguments)
            command = [
                sys.executable, __file__, "--child", url, str(folder), arguments.end.isoformat()
            ]
            completed = subprocess.run(
                command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPOSITORY
            )
            figures = json.loads(completed.stdout.strip().splitlines()[-1])
        finally:
            if database is not None:
                drop_postgres_database(arguments.postgres_url, database)
    figures.update({"leads": leads, "backend": backend, "simulate_seconds": simulate_seconds})
    return figures


def format_case(figures: dict) -> str:
    lines = [
        f"### {figures['leads']:,} leads on {figures['backend']}",
        "",
        "| stage | seconds | rows | rows per second | peak MiB at its end |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for stage in STAGES:
        seconds = figures["stage_seconds"].get(stage)
        if seconds is None:
            continue
        rows = figures["stage_rows"].get(stage, 0)
        rate = f"{rows / seconds:,.0f}" if seconds > 0 and rows else ""
        peak = figures["stage_peak_mib"].get(stage)
        peak_text = f"{peak:,.0f}" if peak is not None else ""
        lines.append(f"| {stage} | {seconds:.1f} | {rows:,} | {rate} | {peak_text} |")
    flow_seconds = figures["flow_seconds"]
    orchestration = figures["orchestration_seconds"]
    lines += [
        f"| whole flow | {flow_seconds:.1f} | | | |",
        "",
        f"- Leads scored: {figures['leads_scored']:,}; simulated in {figures['simulate_seconds']:.0f} s "
        f"(not part of the flow).",
        f"- Peak resident memory of the flow's process: {figures['peak_mib']:,.0f} MiB "
        f"({figures['peak_mib_before_flow']:,.0f} MiB after imports and the warm-up flow).",
        f"- Outside our stage code: {orchestration:.1f} s, {100 * orchestration / flow_seconds:.1f} % "
        f"of the flow.",
    ]
    raw = figures.get("raw_copy")
    publish_seconds = figures.get("publish_task_seconds")
    if raw and publish_seconds and raw["seconds"] > 0:
        ours = figures["stage_rows"].get("publish", 0) / publish_seconds
        theirs = raw["rows"] / raw["seconds"]
        lines.append(
            f"- Publish: the publish-scores task wrote {figures['stage_rows'].get('publish', 0):,} "
            f"rows in {publish_seconds:.2f} s ({ours:,.0f} rows/s); a raw write of the same "
            f"rows took {raw['seconds']:.2f} s ({theirs:,.0f} rows/s): ratio {ours / theirs:.2f}."
        )
    return "\n".join(lines)


def describe_machine() -> str:
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        url, folder, as_of = arguments.child
        figures = run_child(url, Path(folder), dt.date.fromisoformat(as_of))
        print(json.dumps(figures, default=str))
        return 0

    results = []
    for leads in arguments.leads:
        for backend in arguments.backend:
            print(f"running {leads:,} leads on {backend}", file=sys.stderr, flush=True)
            results.append(run_case(leads, backend, arguments))
            print(format_case(results[-1]), flush=True)
            print(flush=True)
    print(describe_machine())
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
