"""Create the Prefect automation that sends a notification when a Fulcrum flow run fails.

The automation is defined in deployments/notify-on-failure.yaml. Its action sends the message
through a notification block that you create first (Slack, Microsoft Teams, a webhook...),
named here as BLOCK_TYPE/BLOCK_NAME::

    python deployments/automation.py slack-webhook/fulcrum-alerts

An automation with the same name is replaced, so the command can be run again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from uuid import UUID

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound

AUTOMATION_FILE = Path(__file__).with_name("notify-on-failure.yaml")


def load_automation(block_document_id: UUID, path: Path = AUTOMATION_FILE) -> AutomationCore:
    """Read the automation file and point its notification action at the given block."""
    data = yaml.safe_load(path.read_text())
    for action in data["actions"]:
        if action["type"] == "send-notification":
            action["block_document_id"] = str(block_document_id)
    return AutomationCore.model_validate(data)


def split_block_reference(reference: str) -> tuple[str, str]:
    """Split 'slack-webhook/fulcrum-alerts' into the block type slug and the block name."""
    type_slug, _, name = reference.partition("/")
    if not type_slug or not name or "/" in name:
        raise ValueError(
            f"the block must be given as BLOCK_TYPE/BLOCK_NAME, such as "
            f"'slack-webhook/fulcrum-alerts'. Got {reference!r}."
        )
    return type_slug, name


async def create_automation(reference: str) -> tuple[str, UUID]:
    """Create or replace the automation; return its name and id."""
    type_slug, block_name = split_block_reference(reference)
    async with get_client() as client:
        try:
            block = await client.read_block_document_by_name(
                name=block_name, block_type_slug=type_slug
            )
        except ObjectNotFound as exc:
            raise ValueError(
                f"no {type_slug} block named {block_name!r} exists on the Prefect server; "
                f"create it in the UI (Blocks) or with the block's save() method first"
            ) from exc
        automation = load_automation(block.id)
        for existing in await client.read_automations_by_name(automation.name):
            await client.delete_automation(existing.id)
        return automation.name, await client.create_automation(automation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "block", help="notification block as BLOCK_TYPE/BLOCK_NAME, e.g. slack-webhook/fulcrum-alerts"
    )
    args = parser.parse_args(argv)
    try:
        name, automation_id = asyncio.run(create_automation(args.block))
    except ValueError as exc:
        print(f"automation.py: {exc}", file=sys.stderr)
        return 2
    print(f"Created automation {name!r} with id {automation_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
