"""Changes to the simulated company that several reliability tests make."""

from __future__ import annotations

from tests.reliability.workspace import CUTOFF_TEXT


def recent_lead_ids(workspace, count: int) -> list[str]:
    """The ids of the newest open leads before the cutoff, newest first."""
    frame = workspace.read(
        "SELECT lead_id FROM leads WHERE created_at < :cutoff AND disqualified_at IS NULL "
        "ORDER BY created_at DESC LIMIT :count",
        cutoff=CUTOFF_TEXT,
        count=count,
    )
    return frame["lead_id"].tolist()


# Lead and account ids, and category values, in scripts and lengths that a VARCHAR(255) or
# an ASCII assumption would break. None of the categories existed when the champions trained.
UNUSUAL_LEAD_IDS = ["客户-线索-0001", "عميل-محتمل-٠٠٢", "🚀-lead-🎯", "L" + "é" * 9_999]
UNUSUAL_ACCOUNT_IDS = ["账户-北京-01", "A" * 10_000]
UNUSUAL_CATEGORIES = {
    "channel": "播客",
    "industry": "الطاقة المتجددة",
    "region": "🌍🌏",
    "seniority": "s" * 10_000,
    "country": "Ελλάδα",
}
UNUSUAL_SEGMENT = "خطة النمو"


def rename_leads_and_accounts(workspace, lead_ids: list[str], account_ids: list[str]) -> None:
    """Give existing leads and accounts the unusual ids and categories, in every table."""
    for old, new in zip(lead_ids, UNUSUAL_LEAD_IDS):
        for table in ("leads", "lead_events", "opportunities"):
            workspace.execute(f"UPDATE {table} SET lead_id = :new WHERE lead_id = :old", new=new, old=old)
        assignments = ", ".join(f"{column} = :{column}" for column in UNUSUAL_CATEGORIES)
        workspace.execute(
            f"UPDATE leads SET {assignments} WHERE lead_id = :new", new=new, **UNUSUAL_CATEGORIES
        )
    workspace.execute(
        "INSERT INTO lead_events VALUES (:lead, :event_type, '2026-06-29 12:00:00.000000')",
        lead=UNUSUAL_LEAD_IDS[0],
        event_type="تنزيل " * 2_000,
    )
    for old, new in zip(account_ids, UNUSUAL_ACCOUNT_IDS):
        for table in ("billing_accounts", "invoices", "opportunities"):
            workspace.execute(
                f"UPDATE {table} SET account_id = :new WHERE account_id = :old", new=new, old=old
            )
        workspace.execute(
            "UPDATE billing_accounts SET plan = :plan WHERE account_id = :new",
            plan=UNUSUAL_SEGMENT, new=new,
        )
