"""The ``load`` command: land a public dataset in the warehouse and write its fulcrum.toml.

``add_load_parser(subparsers)`` adds ``load olist|xeducation|telco DIR`` to a parser, and
``command_load(args)`` runs it, as ``fulcrum load olist path/to/datasets --url
sqlite:///var/olist.db``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from fulcrum.arguments import fraction, iso_date, positive_int
from fulcrum.datasets.common import LoadResult

DEFAULT_CONFIG = Path("fulcrum.toml")


def add_load_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``load`` command and one subcommand per dataset to ``subparsers``."""
    load = subparsers.add_parser(
        "load",
        help="load a public dataset into raw warehouse tables and write the fulcrum.toml "
        "that maps them",
        description=(
            "Read a public dataset's files as published, write them to raw tables in the "
            "warehouse, and write a fulcrum.toml whose SQL mappings turn the raw tables into "
            "Fulcrum's five sources. DIR is the folder that contains the dataset folders "
            "or the dataset folder itself."
        ),
    )
    datasets = load.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    olist = datasets.add_parser(
        "olist",
        help="Olist marketing funnel (CRM) and order items (billing)",
        description="Needs olist_marketing_funnel/ and olist_ecommerce_parquet/ under DIR.",
    )
    _add_common_arguments(olist)
    olist.add_argument(
        "--commission-rate", type=fraction, default=0.10,
        help="Olist's revenue as a share of item price (default 0.10)",
    )
    olist.add_argument(
        "--cost-rate", type=fraction, default=0.30,
        help="share of that revenue spent serving the seller, for the gross margin (default 0.30)",
    )
    olist.add_argument(
        "--churn-months", type=positive_int, default=2,
        help="months of 30 days without a sale after which a seller counts as churned (default 2)",
    )
    olist.add_argument(
        "--sales-end", type=iso_date, default=dt.date(2018, 9, 1),
        help="first day not covered by the order items export; later items are not billed "
        "(default 2018-09-01)",
    )
    olist.add_argument(
        "--freshness-days", type=int, default=100,
        help="freshness_days written to the config, because the MQL export ends on 2018-05-31 "
        "(default 100)",
    )

    xeducation = datasets.add_parser(
        "xeducation",
        help="X Education leads export (CRM only, synthetic timeline)",
        description="Needs x_education_leads/Leads.csv under DIR.",
    )
    _add_common_arguments(xeducation)
    xeducation.add_argument(
        "--start", type=iso_date, default=dt.date(2020, 1, 1),
        help="day the first lead arrives on the synthetic timeline (default 2020-01-01)",
    )
    xeducation.add_argument(
        "--span-days", type=positive_int, default=365,
        help="days over which the leads arrive, in Lead Number order (default 365)",
    )
    xeducation.add_argument(
        "--decision-days", type=positive_int, default=30,
        help="days after arrival at which each lead is won or disqualified (default 30)",
    )

    telco = datasets.add_parser(
        "telco",
        help="IBM Telco customer churn (billing only, invoices rebuilt from tenure)",
        description="Needs ibm_telco_customer_churn/Telco-Customer-Churn.csv under DIR.",
    )
    _add_common_arguments(telco)
    telco.add_argument(
        "--reference-date", type=iso_date, default=dt.date(2024, 1, 1),
        help="first of the month after the snapshot's last month; invoices are rebuilt "
        "backwards from it (default 2024-01-01)",
    )
    telco.add_argument(
        "--cost-rate", type=fraction, default=0.0,
        help="share of revenue spent serving a customer, for the gross margin (default 0)",
    )
    return load


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", type=Path, metavar="DIR",
        help="folder that contains the dataset folders, or the dataset folder",
    )
    parser.add_argument("--url", help="warehouse SQLAlchemy URL (default: settings.warehouse_url)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG,
        help="where to write the generated settings (default: ./fulcrum.toml)",
    )
    target.add_argument(
        "--print", dest="print_config", action="store_true",
        help="print the generated settings instead of writing a file",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing config file")


def command_load(args: argparse.Namespace) -> int:
    """Load the dataset named by ``args.dataset`` and write or print its config.

    Returns 0 on success and 2, with the reason on standard error, when a file is missing,
    a mapping fails on the warehouse or an assumption is invalid.
    """
    from fulcrum.datasets.common import DatasetFileError, SourceMappingError

    if not args.print_config and args.config.exists() and not args.force:
        print(
            f"fulcrum load: {args.config} already exists. Pass --force to replace it, "
            f"--config to write elsewhere or --print to show the settings.",
            file=sys.stderr,
        )
        return 2
    try:
        url = args.url or _default_url()
        result = run_load(args, url)
    except (DatasetFileError, SourceMappingError, ValueError) as exc:
        print(f"fulcrum load: {exc}", file=sys.stderr)
        return 2

    text = result.config.render()
    if args.print_config:
        print(text)
    else:
        args.config.parent.mkdir(parents=True, exist_ok=True)
        args.config.write_text(text, encoding="utf-8")
    print(result.describe(), file=sys.stderr if args.print_config else sys.stdout)
    if not args.print_config:
        print(
            f"Wrote the settings to {args.config}. Run the flow with "
            f"FULCRUM_CONFIG={args.config} or from the folder that contains it."
        )
    return 0


def run_load(args: argparse.Namespace, url: str) -> LoadResult:
    """Run the loader of ``args.dataset`` with the assumptions given on the command line."""
    if args.dataset == "olist":
        from fulcrum.datasets.olist import OlistAssumptions, load_olist

        assumptions = OlistAssumptions(
            commission_rate=args.commission_rate,
            cost_rate=args.cost_rate,
            churn_months=args.churn_months,
            sales_end=args.sales_end,
            freshness_days=args.freshness_days,
        )
        return load_olist(args.dir, url, assumptions)
    if args.dataset == "xeducation":
        from fulcrum.datasets.xeducation import XEducationTimeline, load_xeducation

        timeline = XEducationTimeline(
            start=args.start, span_days=args.span_days, decision_days=args.decision_days
        )
        return load_xeducation(args.dir, url, timeline)
    if args.dataset == "telco":
        from fulcrum.datasets.telco import TelcoAssumptions, load_telco

        assumptions = TelcoAssumptions(reference_date=args.reference_date, cost_rate=args.cost_rate)
        return load_telco(args.dir, url, assumptions)
    raise ValueError(f"unknown dataset {args.dataset!r}")


def _default_url() -> str:
    from fulcrum.settings import load_settings

    return load_settings().warehouse_url.get_secret_value()
