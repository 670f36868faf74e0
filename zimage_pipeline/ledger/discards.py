"""Output discards: the ledger's memory of objects that must not outlive their request.

A request that ends without success after its upload began may have left some of its
objects in the store (S3 lost after the first of two images, say). Nothing names them:
no result, no `stored` audit event. The transaction that ends such a job also queues a
discard here; the worker deletes the request's objects right away when it can, and its
maintenance sweep retries until the store answers. The row goes in the transaction that
records the deletion in the audit chain, so each discard is recorded exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Engine, Table, delete, select, update

from zimage_pipeline.ledger.models import Job, OutputDiscard
from zimage_pipeline.ledger.txn import as_utc, run_read, run_write, upsert_insert, utcnow

DISCARDS = cast(Table, OutputDiscard.__table__)
JOBS = cast(Table, Job.__table__)


@dataclass(frozen=True, slots=True)
class PendingDiscard:
    request_id: str
    job_created_at: datetime  # the objects' keys are built from it
    attempts: int


class DiscardQueue:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def request(self, request_id: str, *, connection: Connection) -> None:
        """Queue a discard inside the caller's transaction (idempotent)."""
        connection.execute(
            upsert_insert(connection, DISCARDS)
            .values(request_id=request_id, requested_at=utcnow(), attempts=0)
            .on_conflict_do_nothing(index_elements=[DISCARDS.c.request_id])
        )

    def pending(self, *, limit: int) -> list[PendingDiscard]:
        """The oldest queued discards first."""
        return run_read(self._engine, lambda c: _pending(c, limit=limit))

    def settle(self, request_id: str, *, connection: Connection) -> bool:
        """Remove the discard inside the caller's transaction; False if another worker's
        sweep settled it first (the caller then records nothing)."""
        removed = connection.execute(delete(DISCARDS).where(DISCARDS.c.request_id == request_id))
        return removed.rowcount == 1

    def note_failure(self, request_id: str, error: str) -> None:
        def work(connection: Connection) -> None:
            connection.execute(
                update(DISCARDS)
                .where(DISCARDS.c.request_id == request_id)
                .values(attempts=DISCARDS.c.attempts + 1, last_error=error[:512])
            )

        run_write(self._engine, work)


def _pending(connection: Connection, *, limit: int) -> list[PendingDiscard]:
    query = (
        select(DISCARDS.c.request_id, DISCARDS.c.attempts, JOBS.c.created_at)
        .join(JOBS, JOBS.c.request_id == DISCARDS.c.request_id)
        .order_by(DISCARDS.c.requested_at)
        .limit(limit)
    )
    return [
        PendingDiscard(row.request_id, as_utc(row.created_at), row.attempts)
        for row in connection.execute(query)
    ]
