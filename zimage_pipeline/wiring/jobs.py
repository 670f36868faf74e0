"""Jobs port on the ledger's JobStore, with cancel-before-arrival tombstones."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from zimage_pipeline.ids import scoped_key
from zimage_pipeline.ledger import jobs as ledger_jobs
from zimage_pipeline.ledger.models import JobStatus
from zimage_pipeline.messages import CancelOutcome, GenerationResult, Status
from zimage_pipeline.ports import BeginKind, CancelDecision, JobBegin

# The payload digest of a job row created by a cancel that arrived before its request:
# no real request can hash to it (a SHA-256 hex digest has 64 characters).
TOMBSTONE = "cancelled-before-arrival"


def cancelled_result(request_id: str, *, on_behalf_of: str | None = None) -> dict[str, Any]:
    result = GenerationResult(
        request_id=request_id,
        on_behalf_of=on_behalf_of,
        status=Status.CANCELLED,
        reason="CANCELLED",
        message="cancelled before it started; nothing was charged",
        finished_at=datetime.now(UTC),
    )
    return result.model_dump(mode="json", by_alias=True)


class LedgerJobs:
    def __init__(self, store: ledger_jobs.JobStore, *, busy_s: float) -> None:
        self._store = store
        self._busy_s = busy_s

    def begin(
        self,
        *,
        request_id: str,
        payload_sha256: str,
        principal: str,
        on_behalf_of: str,
        worker_id: str,
    ) -> JobBegin:
        begun = self._store.begin(
            request_id=request_id,
            payload_sha256=payload_sha256,
            principal=principal,
            on_behalf_of=on_behalf_of,
            worker_id=worker_id,
            busy_s=self._busy_s,
        )
        job = begun.job
        if begun.kind is ledger_jobs.BeginKind.BUSY:
            return JobBegin(BeginKind.BUSY, job.attempts, job.created_at)
        if begun.kind is ledger_jobs.BeginKind.CONFLICT:
            if job.payload_sha256 == TOMBSTONE:
                if job.principal in (principal, on_behalf_of) and job.result is not None:
                    # This publisher cancelled the id before the request came: the
                    # service adopts the row with the request's own result and trail.
                    return JobBegin(
                        BeginKind.TERMINAL,
                        job.attempts,
                        job.created_at,
                        job.result,
                        cancelled_on_arrival=True,
                    )
                # Another publisher's cancel of an id it never used is not a claim on
                # the id: it moves to that publisher's own key, so ids cannot be
                # squatted by cancelling them and the cancel still waits for its request.
                if self._move_tombstone(request_id, job.principal):
                    return self.begin(
                        request_id=request_id,
                        payload_sha256=payload_sha256,
                        principal=principal,
                        on_behalf_of=on_behalf_of,
                        worker_id=worker_id,
                    )
            if job.principal != principal and job.payload_sha256 != TOMBSTONE:
                return JobBegin(BeginKind.FOREIGN, job.attempts, job.created_at)
            return JobBegin(BeginKind.CONFLICT, job.attempts, job.created_at)
        if begun.kind is ledger_jobs.BeginKind.TERMINAL:
            return JobBegin(BeginKind.TERMINAL, job.attempts, job.created_at, job.result)
        return JobBegin(BeginKind.NEW, job.attempts, job.created_at, template=job.template)

    def _move_tombstone(self, request_id: str, tombstone_of: str) -> bool:
        key = scoped_key(request_id, tombstone_of)
        return self._store.move_tombstone(
            request_id,
            TOMBSTONE,
            tombstone_of=tombstone_of,
            to_key=key,
            result=cancelled_result(key),
        )

    def owner(self, request_id: str) -> str | None:
        job = self._store.get(request_id)
        return job.principal if job is not None else None

    def terminal_result(self, request_id: str) -> dict[str, Any] | None:
        job = self._store.get(request_id)
        if job is None or job.status not in ledger_jobs.TERMINAL or job.result is None:
            return None
        return dict(job.result)

    def complete_cancelled(self, request_id: str, result: Mapping[str, Any]) -> bool:
        return self._store.replace_result(request_id, status=JobStatus.CANCELLED, result=result)

    def adopt_cancelled(
        self,
        request_id: str,
        *,
        payload_sha256: str,
        on_behalf_of: str,
        result: Mapping[str, Any],
    ) -> bool:
        return self._store.adopt_cancelled(
            request_id,
            TOMBSTONE,
            payload_sha256=payload_sha256,
            on_behalf_of=on_behalf_of,
            result=result,
        )

    def cancel(self, request_id: str, *, principal: str) -> CancelDecision:
        """Cancel a request that has not started. A cancel may overtake its request (they
        travel on different queues): then a tombstone row remembers it and answers the
        request, when it comes from the same publisher, with `cancelled`. An id that
        holds another publisher's request means this publisher's own, keyed apart."""
        job = self._store.get(request_id)
        if job is not None and principal not in (job.principal, job.on_behalf_of):
            if job.payload_sha256 != TOMBSTONE:
                key = scoped_key(request_id, principal)
                return CancelDecision(self._cancel_key(key, principal), key)
            self._move_tombstone(request_id, job.principal)  # not a claim on the id
        return CancelDecision(self._cancel_key(request_id, principal), request_id)

    def _cancel_key(self, request_id: str, principal: str) -> CancelOutcome:
        job = self._store.get(request_id)
        if job is None:
            if self._store.insert_cancelled(
                request_id, TOMBSTONE, principal=principal, result=cancelled_result(request_id)
            ):
                return CancelOutcome.PENDING
            job = self._store.get(request_id)  # the request won the race
            if job is None:  # and was forgotten meanwhile: nothing to cancel now
                return CancelOutcome.UNKNOWN
        if principal not in (job.principal, job.on_behalf_of):
            return CancelOutcome.UNKNOWN  # someone else's id: nothing to say about it
        if job.payload_sha256 == TOMBSTONE:
            return CancelOutcome.PENDING
        cancelled = cancelled_result(request_id, on_behalf_of=job.on_behalf_of)
        if self._store.cancel(request_id, principal=principal, result=cancelled):
            return CancelOutcome.CANCELLED
        return CancelOutcome.TOO_LATE
