"""Prompt retention: keep, hash only, or redact after N days.

Only `prompt_text` columns are cleared; the payload keeps `prompt_sha256`, which is what
the chain hashes, so the chain verifies unchanged after redaction and a prompt someone
produces later can still be checked against the record.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update

from zimage_pipeline.ledger.models import AuditEventRow, AuditRequest
from zimage_pipeline.settings import AuditSettings, PromptRetention


def apply_prompt_retention(
    engine: Engine, settings: AuditSettings, *, now: datetime | None = None
) -> int:
    """Clear the prompt texts the policy no longer allows; returns how many events lost one.

    `keep`: nothing. `hash`: every text (left over from an earlier policy).
    `redact`: texts of events older than `prompt_redact_after_days`.
    """
    if settings.prompt_retention == PromptRetention.KEEP:
        return 0
    cutoff = None
    if settings.prompt_retention == PromptRetention.REDACT:
        cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.prompt_redact_after_days)
    events = update(AuditEventRow).where(AuditEventRow.prompt_text.is_not(None))
    requests = update(AuditRequest).where(AuditRequest.prompt_text.is_not(None))
    if cutoff is not None:
        events = events.where(AuditEventRow.at < cutoff)
        requests = requests.where(AuditRequest.first_at < cutoff)
    with engine.begin() as conn:
        cleared = conn.execute(events.values(prompt_text=None)).rowcount
        conn.execute(requests.values(prompt_text=None))
    return int(cleared or 0)
