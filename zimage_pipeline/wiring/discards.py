"""The maintenance sweep that deletes what failed requests left in the object store.

The service deletes a failed request's objects as soon as the job ends; this sweep does
it for those it could not (the store was down, the worker died in between): every queued
discard, oldest first, until the store answers. See `ledger/discards.py`.

A discard that can never succeed (its keys cannot be built: a REJECT error, such as
InvalidKeyError for a ledger row whose id is no request id) is ended, not retried every
sweep forever: dequeued with an `outputs_discard_abandoned` audit event naming why.
"""

from __future__ import annotations

import logging

from zimage_pipeline.errors import Disposition, ZImageError
from zimage_pipeline.ledger.discards import DiscardQueue, PendingDiscard
from zimage_pipeline.ports import Ledger, Store

log = logging.getLogger(__name__)


def is_permanent(error: ZImageError) -> bool:
    """Whether no later attempt can succeed: the discard's own input is wrong (REJECT),
    as opposed to a store that is down or refusing for now (FAIL, RETRY), which an
    operator can fix."""
    return error.disposition is Disposition.REJECT


class DiscardSweeper:
    def __init__(
        self,
        queue: DiscardQueue,
        *,
        store: Store,
        ledger: Ledger,
        actor: str,
        batch: int = 50,
    ) -> None:
        self._queue = queue
        self._store = store
        self._ledger = ledger
        self._actor = actor
        self._batch = batch

    def sweep(self) -> int:
        """Work through up to `batch` queued discards; the number settled (abandoned ones
        included). The first store failure ends the sweep (the store is down: the rest
        would fail too); a permanent failure ends only its own discard."""
        settled = 0
        for pending in self._queue.pending(limit=self._batch):
            try:
                keys = self._store.discard(
                    request_id=pending.request_id, created_at=pending.job_created_at
                )
            except ZImageError as exc:
                if not is_permanent(exc):
                    self._queue.note_failure(pending.request_id, str(exc))
                    log.warning("discard of %s's objects failed: %s", pending.request_id, exc)
                    break
                settled += self._abandon(pending, exc)
                continue
            if self._ledger.outputs_discarded(pending.request_id, keys=keys, actor=self._actor):
                settled += 1
                log.info(
                    "discarded %d object(s) of failed request %s", len(keys), pending.request_id
                )
        return settled

    def _abandon(self, pending: PendingDiscard, error: ZImageError) -> int:
        abandoned = self._ledger.outputs_discard_abandoned(
            pending.request_id, cause=error.reason, message=str(error), actor=self._actor
        )
        if abandoned:
            log.error(
                "discard of %s's objects abandoned, it can never succeed (%s): %s",
                pending.request_id,
                error.reason,
                error,
            )
        return int(abandoned)
