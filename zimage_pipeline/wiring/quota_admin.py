"""`quota set` and `quota grant` with their audit trail: each change and an audit event
naming its actor commit in one transaction, so the tamper-evident chain shows who gave
whom more (or less) budget, beside the quota ledger's own entries.

The event's request id is the change's entry id (`admin:<uuid>`, `grant:<id>`), and its
payload names the subject the way the audit index reads it (`user` for a user, `groups`
for a team), so `audit query --user` / `--group` find the changes with the requests.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, Engine

from zimage_pipeline.audit.chain import AuditLog
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_types import TEAM_PREFIX, USER_PREFIX, Window
from zimage_pipeline.ledger.txn import run_write
from zimage_pipeline.ports import AuditRecord
from zimage_pipeline.settings import AuditSettings


def subject_fields(subject: str) -> dict[str, Any]:
    """The audit index's view of a quota subject key."""
    if subject.startswith(USER_PREFIX):
        return {"user": subject.removeprefix(USER_PREFIX)}
    if subject.startswith(TEAM_PREFIX):
        return {"groups": [subject.removeprefix(TEAM_PREFIX)]}
    return {"user": subject}


class AuditedQuotaAdmin:
    def __init__(self, engine: Engine, audit: AuditSettings) -> None:
        self._engine = engine
        self._quota = QuotaLedger(engine)
        self._audit = AuditLog.from_settings(engine, audit)

    @property
    def quota(self) -> QuotaLedger:
        return self._quota

    def set_limit(
        self,
        subject: str,
        *,
        images_per_day: int | None,
        images_per_month: int | None,
        actor: str,
        note: str | None = None,
    ) -> None:
        change_id = f"admin:{uuid.uuid4().hex}"
        cleared = images_per_day is None and images_per_month is None
        payload = {
            **subject_fields(subject),
            "principal": actor,
            "subject": subject,
            "images_per_day": images_per_day,
            "images_per_month": images_per_month,
            "cleared": cleared,
            "note": note,
        }

        def work(connection: Connection) -> None:
            self._quota.set_limit(
                subject,
                images_per_day=images_per_day,
                images_per_month=images_per_month,
                actor=actor,
                note=note,
                change_id=change_id,
                connection=connection,
            )
            record = AuditRecord(change_id, "quota_limit_set", actor, payload)
            self._audit.append_many([record], connection=connection)

        run_write(self._engine, work)

    def grant(
        self,
        subject: str,
        images: int,
        *,
        window: Window,
        actor: str,
        note: str | None = None,
        grant_id: str | None = None,
    ) -> bool:
        """False (and nothing recorded) if a grant with this id was made before."""
        grant_id = grant_id or uuid.uuid4().hex
        payload = {
            **subject_fields(subject),
            "principal": actor,
            "subject": subject,
            "images": images,
            "window": window.value,
            "note": note,
        }

        def work(connection: Connection) -> bool:
            done = self._quota.grant(
                subject,
                images,
                window=window,
                actor=actor,
                note=note,
                grant_id=grant_id,
                connection=connection,
            )
            if done:
                record = AuditRecord(f"grant:{grant_id}", "quota_granted", actor, payload)
                self._audit.append_many([record], connection=connection)
            return done

        return run_write(self._engine, work)
