"""Argument types shared by the ``fulcrum`` commands, with error messages that name the value."""

from __future__ import annotations

import argparse
import datetime as dt


def iso_date(text: str) -> dt.date:
    """Parse a YYYY-MM-DD date; an impossible date such as 2024-02-30 is rejected."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid date in YYYY-MM-DD form") from exc


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1; ``_`` and ``,`` may group digits (1_000_000)."""
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Got {text!r}.") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Got {text!r}.")
    return value


def fraction(text: str) -> float:
    """Parse a number from 0 to 1, such as a rate or a share."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1. Got {text!r}.") from exc
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1. Got {text!r}.")
    return value
