"""Jobs: one row per request_id and its state machine.

    received -> authorized -> running -> succeeded
        |            |           |---> failed | cancelled | expired
        |            |---> rejected | failed | cancelled | expired
        |---> rejected | failed | cancelled | expired

`mark` moves between the non-terminal states; `finish` enters a terminal one and stores
the result the worker published, so a redelivered request is answered by republishing it
(`begin` returns TERMINAL with that result). A terminal job never changes again. A
redelivery of an unfinished job (the previous worker died) takes it over: attempts + 1,
back to `received`, this worker's id. Transitions are conditional UPDATEs, so two workers
can never both move one job.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Connection, Engine, Executable, Row, Table, bindparam, delete, select, update

from zimage_pipeline.errors import InternalStateError
from zimage_pipeline.ledger.models import Job, JobStatus
from zimage_pipeline.ledger.txn import as_utc, dialect_insert, run_read, run_write, utcnow
from zimage_pipeline.messages import TemplateRef

__all__ = [
    "BeginKind",
    "IllegalTransitionError",
    "JobBegin",
    "JobNotFoundError",
    "JobRecord",
    "JobStatus",
    "JobStore",
]

JOBS = cast(Table, Job.__table__)

TERMINAL = frozenset(
    {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.REJECTED,
        JobStatus.CANCELLED,
        JobStatus.EXPIRED,
    }
)
_ENDINGS = frozenset({JobStatus.REJECTED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.RECEIVED: _ENDINGS | {JobStatus.AUTHORIZED},
    JobStatus.AUTHORIZED: _ENDINGS | {JobStatus.RUNNING},
    JobStatus.RUNNING: (_ENDINGS - {JobStatus.REJECTED}) | {JobStatus.SUCCEEDED},
}


class BeginKind(StrEnum):
    NEW = "new"  # first attempt, or a takeover of an unfinished one
    TERMINAL = "terminal"  # already finished: republish `result`
    CONFLICT = "conflict"  # same request_id, different payload or publisher
    BUSY = "busy"  # another worker is working on it right now: try again later


# Both are the code asking the ledger for something its state forbids: internal, so the
# reasons below are for operators and a published result says only INTERNAL_ERROR.
class IllegalTransitionError(InternalStateError):
    reason = "ILLEGAL_TRANSITION"


class JobNotFoundError(InternalStateError):
    reason = "JOB_NOT_FOUND"


@dataclass(frozen=True, slots=True)
class JobRecord:
    request_id: str
    payload_sha256: str
    principal: str
    on_behalf_of: str
    status: JobStatus
    reason: str | None
    attempts: int
    worker_id: str | None
    roles_snapshot: dict[str, Any] | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    # The template version an admitted attempt was rendered from (None: no template, or
    # not admitted yet).
    template: TemplateRef | None = None


@dataclass(frozen=True, slots=True)
class JobBegin:
    kind: BeginKind
    job: JobRecord

    @property
    def attempts(self) -> int:
        return self.job.attempts

    @property
    def created_at(self) -> datetime:
        return self.job.created_at

    @property
    def result(self) -> dict[str, Any] | None:
        return self.job.result if self.kind is BeginKind.TERMINAL else None


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def begin(
        self,
        *,
        request_id: str,
        payload_sha256: str,
        principal: str,
        on_behalf_of: str,
        worker_id: str,
        busy_s: float = 0.0,
    ) -> JobBegin:
        """`busy_s`: an unfinished job another worker touched less than this long ago is
        BUSY, not taken over (a concurrent duplicate must not generate twice); older, its
        worker is presumed dead and the job is taken over."""

        def work(connection: Connection) -> JobBegin:
            at = utcnow()
            # The common case, a new request, in one statement: insert unless the id is
            # taken, and get the row back (a taken id inserts nothing and returns none).
            new = _new_row(request_id, payload_sha256, principal, on_behalf_of, worker_id, at)
            created = connection.execute(_insert_new(connection.dialect.name), new).first()
            if created is not None:
                return JobBegin(BeginKind.NEW, _record(created))
            job = _require(connection, request_id)
            # A different publisher reusing an id must not be handed someone else's result.
            if (job.payload_sha256, job.principal, job.on_behalf_of) != (
                payload_sha256,
                principal,
                on_behalf_of,
            ):
                return JobBegin(BeginKind.CONFLICT, job)
            if job.status in TERMINAL:
                return JobBegin(BeginKind.TERMINAL, job)
            if (
                busy_s > 0
                and job.worker_id != worker_id
                and (at - job.updated_at).total_seconds() < busy_s
            ):
                return JobBegin(BeginKind.BUSY, job)
            taken = connection.execute(
                update(JOBS)
                .where(JOBS.c.request_id == request_id, JOBS.c.attempts == job.attempts)
                .where(JOBS.c.status.not_in([s.value for s in TERMINAL]))
                .values(
                    attempts=JOBS.c.attempts + 1,
                    worker_id=worker_id,
                    status=JobStatus.RECEIVED.value,
                    reason=None,
                    updated_at=at,
                )
            )
            if taken.rowcount != 1:  # another worker moved it first: decide on its state
                return work(connection)
            return JobBegin(BeginKind.NEW, _require(connection, request_id))

        return run_write(self._engine, work)

    def create_running(
        self,
        *,
        request_id: str,
        payload_sha256: str,
        principal: str,
        on_behalf_of: str,
        worker_id: str,
        roles_snapshot: Mapping[str, Any],
        connection: Connection,
        template: TemplateRef | None = None,
    ) -> bool:
        """`begin` and `start` of a first delivery in the caller's transaction: the job
        is inserted running. False, inserting nothing, if the request_id exists."""
        row = _new_row(request_id, payload_sha256, principal, on_behalf_of, worker_id, utcnow())
        row.update(status=JobStatus.RUNNING.value, roles_snapshot=dict(roles_snapshot))
        row.update(_template_columns(template))
        return connection.execute(_insert_new(connection.dialect.name), row).first() is not None

    def mark(
        self,
        request_id: str,
        status: JobStatus | str,
        *,
        reason: str | None = None,
        roles_snapshot: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
    ) -> JobRecord:
        """Move an unfinished job on. `connection`: join the caller's write transaction
        (the caller commits); without, it runs in its own."""
        target = JobStatus(status)
        if target in TERMINAL:
            raise IllegalTransitionError(f"{target.value} is terminal: use finish()")
        values: dict[str, Any] = {"reason": reason}
        if roles_snapshot is not None:
            values["roles_snapshot"] = dict(roles_snapshot)
        return self._move(request_id, target, values, connection)

    def start(
        self,
        request_id: str,
        *,
        roles_snapshot: Mapping[str, Any],
        connection: Connection | None = None,
        template: TemplateRef | None = None,
    ) -> JobRecord:
        """Authorized and running in one step, for an admission that reserves the quota
        in the same transaction (no one can observe the job in between). `template`: the
        one its request was rendered from (recorded on the row)."""
        values = {"reason": None, "roles_snapshot": dict(roles_snapshot)}
        values.update(_template_columns(template))
        sources = (JobStatus.RECEIVED, JobStatus.AUTHORIZED, JobStatus.RUNNING)
        return self._move(request_id, JobStatus.RUNNING, values, connection, sources=sources)

    def touch(
        self, request_id: str, *, worker_id: str, connection: Connection | None = None
    ) -> bool:
        """The owner's heartbeat: keeps an unfinished job from looking abandoned (see
        `busy_s` in begin()). False if the job is finished or another worker owns it."""

        def work(connection: Connection) -> bool:
            touched = connection.execute(
                update(JOBS)
                .where(JOBS.c.request_id == request_id, JOBS.c.worker_id == worker_id)
                .where(JOBS.c.status.not_in([s.value for s in TERMINAL]))
                .values(updated_at=utcnow())
            )
            return touched.rowcount == 1

        if connection is not None:
            return work(connection)
        return run_write(self._engine, work)

    def finish(
        self,
        request_id: str,
        status: JobStatus | str,
        *,
        reason: str | None,
        result: Mapping[str, Any],
        connection: Connection | None = None,
    ) -> JobRecord:
        """End the job with its terminal `result`. `connection`: as for mark()."""
        target = JobStatus(status)
        if target not in TERMINAL:
            raise IllegalTransitionError(f"{target.value} is not terminal: use mark()")
        values = {"reason": reason, "result": dict(result), "finished_at": utcnow()}
        return self._move(request_id, target, values, connection)

    def cancel(
        self,
        request_id: str,
        *,
        principal: str,
        result: Mapping[str, Any] | None = None,
    ) -> bool:
        """Cancel a job that has not started running, on behalf of its publisher or its
        subject; True if it is cancelled (now or already). `result` is what a redelivery
        of the request will be answered with."""
        job = self.get(request_id)
        if job is None or principal not in (job.principal, job.on_behalf_of):
            return False
        if job.status is JobStatus.CANCELLED:
            return True
        if job.status not in (JobStatus.RECEIVED, JobStatus.AUTHORIZED):
            return False
        stored = dict(result) if result is not None else {"status": "cancelled"}
        try:
            self.finish(request_id, JobStatus.CANCELLED, reason="CANCELLED", result=stored)
        except IllegalTransitionError:
            return False  # started meanwhile
        return True

    def move_tombstone(
        self,
        request_id: str,
        tombstone: str,
        *,
        tombstone_of: str,
        to_key: str,
        result: Mapping[str, Any],
    ) -> bool:
        """Move the row a cancel left for an id nobody had used (`tombstone` is its
        payload digest), if it is still `tombstone_of`'s, to that publisher's own key
        `to_key`, in one transaction: the id is free for whoever uses it, and the
        cancel still waits for its publisher's request. True if it was moved."""
        remove = delete(JOBS).where(
            JOBS.c.request_id == request_id,
            JOBS.c.payload_sha256 == tombstone,
            JOBS.c.principal == tombstone_of,
            JOBS.c.status == JobStatus.CANCELLED.value,
        )
        at = utcnow()
        row = {
            **_new_row(to_key, tombstone, tombstone_of, tombstone_of, "cancel", at),
            "status": JobStatus.CANCELLED.value,
            "reason": "CANCELLED",
            "result": dict(result),
            "finished_at": at,
        }

        def work(connection: Connection) -> bool:
            if connection.execute(remove).rowcount != 1:
                return False
            connection.execute(_insert_new(connection.dialect.name), row)
            return True

        return run_write(self._engine, work)

    def insert_cancelled(
        self, request_id: str, tombstone: str, *, principal: str, result: Mapping[str, Any]
    ) -> bool:
        """A cancel's row for an id nobody used yet, inserted already cancelled in one
        statement (a row first `received`, then cancelled, let a request that arrived
        between the two find it half made); False if the id is taken."""
        at = utcnow()
        row = {
            **_new_row(request_id, tombstone, principal, principal, "cancel", at),
            "status": JobStatus.CANCELLED.value,
            "reason": "CANCELLED",
            "result": dict(result),
            "finished_at": at,
        }

        def work(connection: Connection) -> bool:
            return connection.execute(_insert_new(connection.dialect.name), row).first() is not None

        return run_write(self._engine, work)

    def forget_cancels_older_than(self, tombstone: str, older_than: datetime) -> int:
        """Delete the rows of cancels (payload digest `tombstone`) whose request never
        came, made before `older_than`; the number deleted. An adopted row has the
        request's digest by then and stays."""
        statement = (
            delete(JOBS)
            .where(JOBS.c.payload_sha256 == tombstone)
            .where(JOBS.c.created_at < older_than)
        )
        return run_write(self._engine, lambda c: int(c.execute(statement).rowcount))

    def adopt_cancelled(
        self,
        request_id: str,
        tombstone: str,
        *,
        payload_sha256: str,
        on_behalf_of: str,
        result: Mapping[str, Any],
    ) -> bool:
        """Give a cancel's row (payload digest `tombstone`) to the request it waited for:
        its digest, subject and full result; True if this call did (its first arrival)."""
        statement = (
            update(JOBS)
            .where(JOBS.c.request_id == request_id, JOBS.c.payload_sha256 == tombstone)
            .values(
                payload_sha256=payload_sha256,
                on_behalf_of=on_behalf_of,
                result=dict(result),
                updated_at=utcnow(),
            )
        )
        return run_write(self._engine, lambda c: c.execute(statement).rowcount == 1)

    def replace_result(
        self, request_id: str, *, status: JobStatus, result: Mapping[str, Any]
    ) -> bool:
        """Replace the stored result of a job that ended `status` (a cancel's result,
        completed by the request's own delivery with what only it knows)."""
        statement = (
            update(JOBS)
            .where(JOBS.c.request_id == request_id, JOBS.c.status == status.value)
            .values(result=dict(result), updated_at=utcnow())
        )
        return run_write(self._engine, lambda c: c.execute(statement).rowcount == 1)

    def get(self, request_id: str) -> JobRecord | None:
        return run_read(self._engine, lambda c: _load(c, request_id))

    def _move(
        self,
        request_id: str,
        target: JobStatus,
        values: dict[str, Any],
        connection: Connection | None,
        *,
        sources: Sequence[JobStatus] | None = None,
    ) -> JobRecord:
        if sources is None:
            sources = [s for s, targets in ALLOWED.items() if target in targets]
        statement = _move_from(tuple(s.value for s in sources))
        params = {"rid": request_id, "status": target.value, "updated_at": utcnow(), **values}

        def work(connection: Connection) -> JobRecord:
            moved = connection.execute(statement, params).first()
            if moved is not None:
                return _record(moved)
            job = _load(connection, request_id)
            if job is None:
                raise JobNotFoundError(f"no job for request {request_id!r}")
            if job.status is target:
                return job  # repeated (redelivered) step: already there
            raise IllegalTransitionError(
                f"job {request_id!r} cannot go from {job.status.value} to {target.value}"
            )

        if connection is not None:
            return work(connection)
        return run_write(self._engine, work)


def _new_row(
    request_id: str,
    payload_sha256: str,
    principal: str,
    on_behalf_of: str,
    worker_id: str,
    at: datetime,
) -> dict[str, Any]:
    """A first delivery's job row, received, attempt 1."""
    return {
        "request_id": request_id,
        "payload_sha256": payload_sha256,
        "principal": principal,
        "on_behalf_of": on_behalf_of,
        "status": JobStatus.RECEIVED.value,
        "attempts": 1,
        "worker_id": worker_id,
        "created_at": at,
        "updated_at": at,
    }


# The two statements every request runs, built once: building a statement costs more
# Python time than its round trip. The values come as parameters at execution (an
# UPDATE sets the columns its parameters name).
@functools.cache
def _insert_new(dialect: str) -> Executable:
    insert = dialect_insert(dialect, JOBS)
    return insert.on_conflict_do_nothing(index_elements=[JOBS.c.request_id]).returning(*JOBS.c)


@functools.cache
def _move_from(sources: tuple[str, ...]) -> Executable:
    return (
        update(JOBS)
        .where(JOBS.c.request_id == bindparam("rid"), JOBS.c.status.in_(sources))
        .returning(*JOBS.c)  # one round trip: this runs on every request
    )


def _load(connection: Connection, request_id: str) -> JobRecord | None:
    row = connection.execute(select(JOBS).where(JOBS.c.request_id == request_id)).first()
    return None if row is None else _record(row)


def _record(row: Row[Any]) -> JobRecord:
    return JobRecord(
        request_id=row.request_id,
        payload_sha256=row.payload_sha256,
        principal=row.principal,
        on_behalf_of=row.on_behalf_of,
        status=JobStatus(row.status),
        reason=row.reason,
        attempts=row.attempts,
        worker_id=row.worker_id,
        roles_snapshot=row.roles_snapshot,
        result=row.result,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        finished_at=as_utc(row.finished_at) if row.finished_at else None,
        template=_template_of(row),
    )


def _require(connection: Connection, request_id: str) -> JobRecord:
    job = _load(connection, request_id)
    if job is None:
        raise JobNotFoundError(f"no job for request {request_id!r}")
    return job


def _template_of(row: Row[Any]) -> TemplateRef | None:
    if row.template_id is None or row.template_version is None:
        return None
    return TemplateRef(id=row.template_id, version=row.template_version, sha256=row.template_sha256)


def _template_columns(template: TemplateRef | None) -> dict[str, Any]:
    """The job row's record of the template a request was rendered from (NULLs: none)."""
    if template is None:
        return {}
    return {
        "template_id": template.id,
        "template_version": template.version,
        "template_sha256": template.sha256,
    }
