"""Extract: read the five sources from the warehouse as they stood at the as-of cutoff."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass
class SourceFrames:
    """The five sources as DataFrames with the contract's column names, UTC-aware timestamps."""

    leads: pd.DataFrame
    lead_events: pd.DataFrame
    opportunities: pd.DataFrame
    billing_accounts: pd.DataFrame
    invoices: pd.DataFrame

    def items(self):
        return {
            "leads": self.leads,
            "lead_events": self.lead_events,
            "opportunities": self.opportunities,
            "billing_accounts": self.billing_accounts,
            "invoices": self.invoices,
        }.items()

    def row_counts(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.items()}
