"""Fulcrum: nightly B2B lead scores on two axes, conversion probability and account value."""

__version__ = "0.1.0"
