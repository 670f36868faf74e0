"""Ledger port: each step of a request is one transaction over jobs, quota and audit.

Statement order inside every transaction is the lock order: the quota rows (reservation,
counters), then the job row, then the audit chain head last. The head is the one lock
every worker shares, so it is taken at the end and held only for the audit statements
and the commit. (`admit_new` inserts its job row first: a row no other transaction can
be waiting for, since every other step of that request starts only after it commits.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine

from zimage_pipeline.audit.chain import AuditLog
from zimage_pipeline.ledger.discards import DiscardQueue
from zimage_pipeline.ledger.jobs import JobStore
from zimage_pipeline.ledger.models import JobStatus
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_types import QuotaExceededError
from zimage_pipeline.ledger.txn import run_write
from zimage_pipeline.messages import TemplateRef
from zimage_pipeline.ports import AuditRecord, Authorization, NewJob, QuotaLeft
from zimage_pipeline.wiring.identity import policy_of


class LedgerUnits:
    def __init__(
        self,
        engine: Engine,
        *,
        jobs: JobStore,
        quota: QuotaLedger,
        audit: AuditLog,
        discards: DiscardQueue,
        lease_s: float,
    ) -> None:
        self._engine = engine
        self._jobs = jobs
        self._quota = quota
        self._audit = audit
        self._discards = discards
        self._lease_s = lease_s

    def admit(
        self,
        *,
        request_id: str,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        template: TemplateRef | None = None,
    ) -> None:
        def work(connection: Connection) -> None:
            self._reserve(request_id, authorization, images, connection)
            self._jobs.start(
                request_id,
                roles_snapshot=authorization.roles_snapshot,
                connection=connection,
                template=template,
            )
            self._audit.append_many(audit, connection=connection)

        try:
            run_write(self._engine, work)
        except QuotaExceededError:
            # A crashed worker's lapsed hold must not deny a live request: settle, retry.
            if self._quota.expire_leases() == 0:
                raise
            run_write(self._engine, work)

    def admit_new(
        self,
        *,
        job: NewJob,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        template: TemplateRef | None = None,
    ) -> bool:
        def work(connection: Connection) -> bool:
            # The job row first: a taken id is the common reason to fall back, and it
            # is found before any quota row is locked.
            if not self._jobs.create_running(
                request_id=job.request_id,
                payload_sha256=job.payload_sha256,
                principal=job.principal,
                on_behalf_of=job.on_behalf_of,
                worker_id=job.worker_id,
                roles_snapshot=authorization.roles_snapshot,
                connection=connection,
                template=template,
            ):
                return False
            self._reserve(job.request_id, authorization, images, connection)
            self._audit.append_many(audit, connection=connection)
            return True

        try:
            return run_write(self._engine, work)
        except QuotaExceededError:
            return False  # rolled back, the job row too: the step-by-step path refuses

    def _reserve(
        self, request_id: str, authorization: Authorization, images: int, connection: Connection
    ) -> None:
        policy = policy_of(authorization)
        self._quota.reserve(
            request_id=request_id,
            user=authorization.subject,
            teams=policy.teams,
            images=images,
            user_limits=policy.user_quota,
            lease_s=self._lease_s,
            connection=connection,
        )

    def heartbeat(self, request_id: str, *, worker_id: str) -> bool:
        def work(connection: Connection) -> bool:
            owned = self._jobs.touch(request_id, worker_id=worker_id, connection=connection)
            if owned:
                self._quota.extend_lease(request_id, self._lease_s, connection=connection)
            return owned

        return run_write(self._engine, work)

    def complete(
        self,
        *,
        request_id: str,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        result_of: Callable[[QuotaLeft], Mapping[str, Any]],
    ) -> None:
        policy = policy_of(authorization)

        def work(connection: Connection) -> None:
            charged = self._quota.commit(request_id, images, connection=connection)
            left = self._quota.remaining(
                user=authorization.subject,
                teams=policy.teams,
                user_limits=policy.user_quota,
                connection=connection,
                known=charged.counters,  # the rows the charge just locked: no second read
            )
            self._jobs.finish(
                request_id,
                JobStatus.SUCCEEDED,
                reason=None,
                result=result_of(QuotaLeft(day=left.day, month=left.month)),
                connection=connection,
            )
            self._audit.append_many(audit, connection=connection)

        run_write(self._engine, work)

    def conclude(
        self,
        *,
        request_id: str,
        status: str,
        reason: str,
        result: Mapping[str, Any],
        release: bool,
        audit: Sequence[AuditRecord],
        discard_outputs: bool = False,
        release_event: AuditRecord | None = None,
    ) -> None:

        def work(connection: Connection) -> None:
            held = release and self._quota.release(request_id, reason, connection=connection)
            self._jobs.finish(
                request_id, status, reason=reason, result=result, connection=connection
            )
            if discard_outputs:
                self._discards.request(request_id, connection=connection)
            events = [*audit, release_event] if held and release_event else audit
            self._audit.append_many(events, connection=connection)

        run_write(self._engine, work)

    def outputs_discarded(self, request_id: str, *, keys: Sequence[str], actor: str) -> bool:
        record = AuditRecord(request_id, "outputs_discarded", actor, {"keys": sorted(keys)})
        # Nothing had been stored: nothing to record.
        return self._settle_discard(request_id, [record] if keys else [])

    def outputs_discard_abandoned(
        self, request_id: str, *, cause: str, message: str, actor: str
    ) -> bool:
        # `cause`, not `reason`: the audit index takes a request's reason from the latest
        # event that names one, and the request's reason is still why it failed.
        payload = {"cause": cause, "message": message[:512]}
        record = AuditRecord(request_id, "outputs_discard_abandoned", actor, payload)
        return self._settle_discard(request_id, [record])

    def _settle_discard(self, request_id: str, records: Sequence[AuditRecord]) -> bool:
        def work(connection: Connection) -> bool:
            if not self._discards.settle(request_id, connection=connection):
                return False
            if records:
                self._audit.append_many(records, connection=connection)
            return True

        return run_write(self._engine, work)
