"""Refuse a message that is not a request of the ledger (invalid, without a publisher,
an id conflict): answered and dead-lettered with a clear reason, and audited within a
per-publisher budget."""

from __future__ import annotations

import hashlib
import time

from zimage_pipeline.decoding import peek_request_id, read_json_object
from zimage_pipeline.errors import RequestRejectedError
from zimage_pipeline.junk_audit import (
    SUMMARY_EVENT,
    UNIDENTIFIED_PREFIX,
    JunkAuditBudget,
    JunkSummary,
)
from zimage_pipeline.messages import GenerationResult
from zimage_pipeline.ports import Audit, AuditRecord
from zimage_pipeline.results import readable_context, rejected
from zimage_pipeline.stages.runtime import Runtime

# How much of an oversized body is parsed to name the id it claimed in the answer.
CLAIM_READ_LIMIT_BYTES = 1024 * 1024


class MessageRefusal:
    def __init__(self, runtime: Runtime, audit: Audit) -> None:
        self._runtime = runtime
        self._audit = audit
        self._junk = JunkAuditBudget()

    async def refuse(
        self, body: bytes, error: RequestRejectedError, *, principal: str | None
    ) -> GenerationResult:
        """The answer to a refused message. It never speaks for, or writes into, a
        request id: anyone can publish junk under anyone's id, so the answer has
        `request_id` "" and names the id it claimed in `claimed_request_id`, and the
        trail is a `denied` event under `unidentified-<sha256 of the bytes>`, never an
        event of that id. Nothing is claimed, so no id can be squatted with junk; the
        same bytes get the same answer, and a later valid request may use the id."""
        document = read_json_object(body, max_bytes=CLAIM_READ_LIMIT_BYTES)
        claimed = peek_request_id(body, max_bytes=CLAIM_READ_LIMIT_BYTES)
        await self._audit_unidentified(body, error, principal=principal, claimed=claimed)
        return rejected("", error).model_copy(
            update={"claimed_request_id": claimed, **readable_context(document)}
        )

    async def _audit_unidentified(
        self,
        body: bytes,
        error: RequestRejectedError,
        *,
        principal: str | None,
        claimed: str | None,
    ) -> None:
        """A `denied` event under `unidentified-<sha256 of the bytes>` (the same bytes,
        the same id), naming who published it, why it was refused and the id it
        claimed, if any; past the publisher's budget (junk_audit), only counted for its
        window's summary."""
        who = principal or "unauthenticated"
        now = time.time()
        summaries = self._junk.take_summaries(now=now)
        if summaries:
            await self._write_summaries(summaries)
        if not self._junk.admit(who, error.reason, now=now):
            return
        digest = hashlib.sha256(body).hexdigest()
        await self._runtime.io(
            self._audit.append,
            request_id=f"{UNIDENTIFIED_PREFIX}{digest[:32]}",
            event_type="denied",
            actor=who,
            payload={
                "principal": principal,
                "reason": error.reason,
                "message": str(error),
                "body_sha256": digest,
                "bytes": len(body),
                "claimed_request_id": claimed or None,
            },
        )

    async def flush_summaries(self, *, all_windows: bool = False) -> None:
        """Write the summaries of closed junk windows (the worker calls this periodically
        and at shutdown, so a count is written even when the junk stops)."""
        summaries = self._junk.take_summaries(now=time.time(), all_windows=all_windows)
        if summaries:
            await self._write_summaries(summaries)

    async def _write_summaries(self, summaries: list[JunkSummary]) -> None:
        records = [
            AuditRecord(s.request_id, SUMMARY_EVENT, s.publisher, s.payload()) for s in summaries
        ]
        await self._runtime.io(self._audit.append_many, records)
