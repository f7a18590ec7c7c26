"""The ``fulcrum`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys

from fulcrum.arguments import iso_date, positive_int
from fulcrum.datasets.cli import add_load_parser, command_load

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
}

DEMO_LEADS = 20_000
DEMO_MONTHS = 24


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fulcrum",
        description=(
            "Score B2B leads nightly on two axes, conversion probability and account value "
            "(LTV), and write overlay scores back to the warehouse. Settings come from "
            "FULCRUM_* environment variables and an optional fulcrum.toml."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init_db = commands.add_parser(
        "init-db",
        help="create the output tables if they do not exist, and mark runs whose process "
        "ended while 'running' as failed",
    )
    init_db.add_argument("--url", help="warehouse SQLAlchemy URL (default: settings.warehouse_url)")

    simulate = commands.add_parser(
        "simulate", help="write a simulated B2B SaaS company's CRM and billing tables"
    )
    simulate.add_argument("--leads", type=positive_int, default=DEMO_LEADS, help="number of leads")
    simulate.add_argument("--months", type=positive_int, default=DEMO_MONTHS, help="months of lead arrivals")
    simulate.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same tables")
    simulate.add_argument("--url", help="target SQLAlchemy URL (default: settings.warehouse_url)")
    simulate.add_argument(
        "--end",
        type=iso_date,
        default=None,
        help="first day after the simulated period, YYYY-MM-DD; every timestamp is before it "
        "(default: today, UTC)",
    )

    run = commands.add_parser("run", help="run the nightly-scores flow once on an existing warehouse")
    run.add_argument(
        "--as-of", type=iso_date, default=None,
        help="data date YYYY-MM-DD (default: today in the business time zone)",
    )
    run.add_argument("--no-retrain", action="store_true", help="score with the current champions only")

    backfill = commands.add_parser(
        "backfill", help="score a range of past dates point in time, oldest first (backfill-scores flow)"
    )
    backfill.add_argument("--start", required=True, help="first data date, YYYY-MM-DD")
    backfill.add_argument("--end", required=True, help="last data date, YYYY-MM-DD, included")
    backfill.add_argument(
        "--every", choices=("day", "week", "month"), default="day", help="step between dates (default: day)"
    )
    backfill.add_argument(
        "--retrain", action="store_true",
        help="retrain both models at each date (default: score with the models that were champion then)",
    )
    backfill.add_argument(
        "--force", action="store_true", help="score dates again that already have a succeeded run"
    )

    demo = commands.add_parser(
        "demo", help="simulate a company into the embedded SQLite warehouse and score it"
    )
    demo.add_argument("--leads", type=positive_int, default=DEMO_LEADS, help="number of simulated leads")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the simulated company")

    show = commands.add_parser("settings", help="print the resolved settings with passwords masked")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML-like lines")

    add_load_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Prefect's client logs every API request at INFO through httpx, and Great Expectations
    # logs its temporary context's set-up at INFO, over several lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.verbose:
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
    handlers = {
        "init-db": command_init_db,
        "simulate": command_simulate,
        "run": command_run,
        "backfill": command_backfill,
        "demo": command_demo,
        "settings": command_settings,
        "load": command_load,
    }
    from pydantic import ValidationError

    try:
        return handlers[args.command](args)
    except ValidationError as exc:
        print(f"fulcrum: invalid settings:\n{exc}", file=sys.stderr)
        return 2


def command_settings(args: argparse.Namespace) -> int:
    import json

    from fulcrum.settings import load_settings

    data = load_settings().redacted()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            print(f"{key} = {value!r}")
    return 0


def command_init_db(args: argparse.Namespace) -> int:
    from fulcrum.settings import load_settings
    from fulcrum.warehouse import Warehouse

    settings = load_settings(**({"warehouse_url": args.url} if args.url else {}))
    warehouse = Warehouse.from_settings(settings)
    created = warehouse.create_output_tables()
    print(f"Output tables ready in {warehouse.display_url}: created {created or 'none (all existed)'}")

    marked = warehouse.fail_abandoned_runs(dt.timedelta(hours=settings.stale_run_after_hours))
    listed = f" ({', '.join(sorted(marked))})" if marked else ""
    print(f"Abandoned runs marked failed in score_runs: {len(marked)}{listed}")
    return 0


def command_simulate(args: argparse.Namespace) -> int:
    from fulcrum.settings import load_settings
    from fulcrum.simulate import simulate_company

    settings = load_settings(**({"warehouse_url": args.url} if args.url else {}))
    summary = simulate_company(
        settings.warehouse_url.get_secret_value(),
        leads=args.leads,
        months=args.months,
        seed=args.seed,
        end=args.end,
        horizon_days=settings.horizon_days,
        progress=sys.stderr.isatty(),
    )
    print(summary.describe())
    return 0


def command_run(args: argparse.Namespace) -> int:
    from flows.nightly import StageError, nightly_scores
    from fulcrum.settings import load_settings

    # Resolved here first, so that invalid settings fail at once, before Prefect starts.
    load_settings()
    try:
        result = nightly_scores(as_of=args.as_of, retrain=not args.no_retrain)
    except StageError as exc:
        # Prefect has already logged the traceback, so the last line only states the outcome.
        print(f"fulcrum run: the run failed in stage '{exc.stage}': {exc.__cause__}", file=sys.stderr)
        return 1
    print_result(result)
    return 0 if result.status == "succeeded" else 1


def command_backfill(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from flows.backfill import BackfillError, backfill_dates, backfill_scores

    # Checked before the flow starts, so a typo fails at once instead of after Prefect's startup.
    try:
        backfill_dates(args.start, args.end, args.every)
    except ValueError as exc:
        print(f"fulcrum backfill: {exc}", file=sys.stderr)
        return 2

    try:
        # Log lines are written above the progress bar instead of through it.
        with logging_redirect_tqdm():
            report = backfill_scores(
                start=args.start, end=args.end, every=args.every, retrain=args.retrain, force=args.force
            )
    except BackfillError as exc:
        print(exc.report.describe())
        print(f"fulcrum backfill: {exc}", file=sys.stderr)
        return 1
    print(report.describe())
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from fulcrum.settings import load_settings
    from fulcrum.simulate import simulate_company
    from flows.nightly import nightly_scores

    settings = load_settings()
    today = dt.datetime.now(settings.timezone).date()
    print(f"Simulating {args.leads:,} leads over {DEMO_MONTHS} months into {settings.redacted()['warehouse_url']} ...")
    summary = simulate_company(
        settings.warehouse_url.get_secret_value(),
        leads=args.leads,
        months=DEMO_MONTHS,
        seed=args.seed,
        end=today,
        horizon_days=settings.horizon_days,
        progress=sys.stderr.isatty(),
    )
    print(summary.describe())
    print(f"Running the nightly-scores flow as of {today} ...")
    result = nightly_scores(as_of=today)
    print_result(result)
    return 0 if result.status == "succeeded" else 1


def print_result(result) -> None:
    from fulcrum.settings import load_settings
    from flows.reporting import headline_metrics

    settings = load_settings()
    print()
    print(f"Run {result.run_id} as of {result.as_of}: {result.status}")
    print(f"  scores: table lead_scores ({result.leads_scored:,} open leads) in {settings.redacted()['warehouse_url']}")
    print(f"  labels: table account_ltv ({result.accounts_labelled:,} accounts)")
    print(f"  models: conversion v{result.conversion_model_version}, value v{result.value_model_version or '-'}"
          f" in MLflow at {settings.redacted()['mlflow_tracking_uri']}")
    for model, name, value in headline_metrics(result.metrics):
        print(f"  {model:<10} {name:<16} {value:.4f}")
    for note in result.notes:
        print(f"  note: {note}")
    if result.frontier is not None and not result.frontier.empty:
        print()
        print(f"Volume/value frontier: reps work the top {settings.rep_capacity} leads by overlay score")
        print(result.frontier.to_string(index=False, float_format=lambda v: f"{v:,.2f}"))


if __name__ == "__main__":
    sys.exit(main())
