"""Write prefect.yaml from the settings, so the nightly schedule runs in the business time zone.

Run it from the repository root after changing ``nightly_cron`` or ``business_timezone``
(in fulcrum.toml or FULCRUM_* variables), then deploy::

    python deployments/render.py
    prefect deploy --all

``--check`` writes nothing: it exits with status 1 when prefect.yaml differs from what the
settings give, or when a scheduled deployment in it lacks an explicit time zone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from prefect.client.schemas.schedules import CronSchedule

from fulcrum.settings import Settings, load_settings

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
WORK_POOL = "fulcrum"

HEADER = """\
# Prefect deployments of Fulcrum, written by `python deployments/render.py` from the settings
# nightly_cron and business_timezone. Change those settings and render again instead of
# editing this file. docs/operations.md shows how to create the work pool and deploy.
#
# There is no pull section: `prefect deploy`, run from the repository root, then adds a
# set_working_directory step to that folder, so a process worker on the same machine runs
# the flows from this checkout, with the installed environment.
"""


def build_config(settings: Settings) -> dict[str, Any]:
    """Return the prefect.yaml content: the nightly and backfill deployments on one work pool."""
    # CronSchedule rejects an invalid cron expression or time zone, before anything is written.
    CronSchedule(cron=settings.nightly_cron, timezone=settings.business_timezone)
    return {
        "name": "fulcrum",
        "deployments": [
            {
                "name": "nightly",
                "entrypoint": "flows/nightly.py:nightly_scores",
                "description": (
                    "Score every open lead each night, as of the run's scheduled date in "
                    f"{settings.business_timezone}"
                ),
                "tags": ["fulcrum"],
                "parameters": {},
                "work_pool": {"name": WORK_POOL, "job_variables": {}},
                "schedules": [
                    {
                        "cron": settings.nightly_cron,
                        "timezone": settings.business_timezone,
                        "active": True,
                    }
                ],
            },
            {
                "name": "backfill",
                "entrypoint": "flows/backfill.py:backfill_scores",
                "description": "Score a range of past dates point in time; started by hand",
                "tags": ["fulcrum"],
                "parameters": {},
                "work_pool": {"name": WORK_POOL, "job_variables": {}},
                "schedules": [],
            },
        ],
    }


def render(settings: Settings) -> str:
    """Return the text of prefect.yaml for ``settings``."""
    body = yaml.safe_dump(
        build_config(settings), sort_keys=False, default_flow_style=False, width=100
    )
    return HEADER + body


def schedule_problems(config: dict[str, Any]) -> list[str]:
    """Return one message per schedule in a prefect.yaml config that lacks a valid time zone."""
    problems = []
    for deployment in config.get("deployments") or []:
        name = deployment.get("name", "<unnamed>")
        for position, schedule in enumerate(deployment.get("schedules") or []):
            zone = schedule.get("timezone")
            if not zone:
                problems.append(
                    f"deployment {name!r} schedule {position} has no timezone; every schedule "
                    f"must name one, such as the business_timezone setting"
                )
                continue
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(
                    f"deployment {name!r} schedule {position} has timezone {zone!r}, which is "
                    f"not an IANA zone name"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=PREFECT_YAML, help="file to write")
    parser.add_argument(
        "--check", action="store_true", help="compare with the file instead of writing it"
    )
    args = parser.parse_args(argv)
    text = render(load_settings())

    if not args.check:
        args.output.write_text(text)
        print(f"wrote {args.output}")
        return 0

    current = args.output.read_text()
    problems = schedule_problems(yaml.safe_load(current))
    if current != text:
        problems.append(
            f"{args.output} differs from what the settings give; run deployments/render.py"
        )
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
