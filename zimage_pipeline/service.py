"""The use case: one delivery in, exactly one terminal result out.

Written against ports only. Every blocking call runs off the event loop: the engine on a
single GPU thread, everything else on a small I/O pool. The worker owns AMQP (acks,
publishing, retries); this module decides *what* the answer is.

Crash safety comes from the ledger: `Jobs.begin` makes a redelivered request either a
takeover (unfinished) or a republish (finished); reserve/commit/release are idempotent
per request_id; seeds are derived from the request so a retried generation writes the
same objects under the same keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from zimage_pipeline.admission import RequestExpiredError, check_limits, ending_status
from zimage_pipeline.decoding import decode_request, peek_request_id, read_json_object
from zimage_pipeline.errors import (
    AttemptsExhaustedError,
    Disposition,
    InternalStateError,
    InvalidRequestError,
    JobBusyError,
    PluginFailedError,
    PromptRefusedError,
    RequestRejectedError,
    ZImageError,
)
from zimage_pipeline.ids import is_scoped_key, scoped_key
from zimage_pipeline.junk_audit import (
    SUMMARY_EVENT,
    UNIDENTIFIED_PREFIX,
    JunkAuditBudget,
    JunkSummary,
)
from zimage_pipeline.messages import (
    CancelOutcome,
    GenerationRequest,
    GenerationResult,
    Priority,
    Status,
)
from zimage_pipeline.plugins.api import (
    DERIVED_FORMATS,
    DERIVED_NAME,
    DerivedImage,
    PromptSubject,
    SourceImage,
)
from zimage_pipeline.plugins.registry import LoadedPlugins
from zimage_pipeline.ports import (
    Audit,
    AuditRecord,
    Authorization,
    Authorizer,
    BeginKind,
    EncodedDerived,
    EncodedImage,
    Encoder,
    Engine,
    ImageSpec,
    Jobs,
    Ledger,
    ModelIdentity,
    NewJob,
    QuotaLeft,
    RawImage,
    ResultOutbox,
    Store,
)
from zimage_pipeline.results import (
    MAX_SEED,
    audit_record_of,
    generated_payload,
    image_specs,
    readable_context,
    rejected,
    stored_payload,
    succeeded_result,
)
from zimage_pipeline.watchdog import GenerationWatchdog

log = logging.getLogger(__name__)
T = TypeVar("T")
# The audit trail's id for a message that could not be answered under a request id.
# How much of an oversized body is parsed to name the id it claimed in the answer.
CLAIM_READ_LIMIT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker must do with a delivery after the service has answered it."""

    result: GenerationResult
    dead_letter: bool = False  # the original goes to the DLQ with the reason in headers
    republished: bool = False  # answered before (redelivery or duplicate)
    # The ledger's key of the request answered, when it is not the result's request_id
    # (a publisher's request under an id another publisher holds: ids.scoped_key).
    ledger_key: str | None = None


@dataclass(slots=True)
class Ports:
    jobs: Jobs
    authorizer: Authorizer
    ledger: Ledger
    engine: Engine
    encoder: Encoder
    store: Store
    audit: Audit
    # The enabled plugins (plugins/registry.py); none by default.
    plugins: LoadedPlugins = field(default_factory=LoadedPlugins)
    # Where results go for the result-sink plugins; None when none is enabled.
    outbox: ResultOutbox | None = None


@dataclass(slots=True)
class ServiceConfig:
    worker_id: str
    max_body_bytes: int = 64 * 1024
    # How often a job this worker holds is marked alive in the ledger (0: never). Well
    # under `worker.job_busy_s`, after which an untouched job counts as abandoned.
    heartbeat_s: float = 0.0
    # A request started more often than this (retries, takeovers after crashes) ends
    # failed ATTEMPTS_EXHAUSTED without running again (0: no limit).
    max_job_attempts: int = 0
    # A plugin call running longer than this ends its request PLUGIN_FAILED.
    plugin_timeout_s: float = 60.0


@dataclass(slots=True)
class _Job:
    request: GenerationRequest
    principal: str
    payload_sha256: str
    attempt: int
    created_at: datetime
    timings: dict[str, float] = field(default_factory=dict)
    reserved: bool = False
    # The upload began: a failure from here on may leave objects that must be deleted.
    store_started: bool = False
    pending_audit: list[AuditRecord] = field(default_factory=list)


def authorized_payload(auth: Authorization) -> dict[str, Any]:
    return {
        "user": auth.subject,
        "principal": auth.principal,
        "groups": list(auth.groups),
        "roles": dict(auth.roles_snapshot),
    }


def quota_reserved(job: _Job) -> AuditRecord:
    request = job.request
    return AuditRecord(
        request.request_id, "quota_reserved", job.principal, {"images": request.num_images}
    )


@dataclass(frozen=True, slots=True)
class _Authorized:
    """The directory's answer, asked once per delivery before the ledger is touched: an
    authorization, or the error that is the request's outcome if it is to run."""

    outcome: Authorization | ZImageError
    seconds: float
    # The admission checks' verdict on an authorized request (role limits, what the
    # plugins accept: its renditions, its prompt): the error it ends with, or None.
    refusal: ZImageError | None = None

    def get(self) -> Authorization:
        if isinstance(self.outcome, ZImageError):
            raise self.outcome
        return self.outcome

    def admitted(self) -> Authorization:
        """The authorization of a request the admission checks let through, else the
        error that is its outcome (the directory's first, then the checks')."""
        auth = self.get()
        if self.refusal is not None:
            raise self.refusal
        return auth


def _ending_payload(request: GenerationRequest, error: ZImageError, reason: str) -> dict[str, Any]:
    payload = {"user": request.on_behalf_of, "reason": reason, "message": str(error)}
    payload.update(error.audit_details())
    if reason != error.reason:
        payload["internal_reason"] = error.reason
    return payload


def _answered_as(outcome: Outcome, request_id: str, ledger_key: str) -> Outcome:
    """`outcome` of the request the ledger keys `ledger_key`, told under the client's id."""
    if ledger_key == request_id or not outcome.result.request_id:
        return outcome
    result = outcome.result.model_copy(update={"request_id": request_id})
    return replace(outcome, result=result, ledger_key=ledger_key)


def payload_digest(request: GenerationRequest) -> str:
    canonical = json.dumps(
        request.model_dump(mode="json", by_alias=True), sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def effective_seed(request: GenerationRequest, payload_sha256: str) -> int:
    """The client's seed, or one derived from the request: recorded in the result and
    the same on every retry, so a retried generation reproduces the same images."""
    if request.seed is not None:
        return request.seed
    digest = hashlib.sha256(f"seed:{request.request_id}:{payload_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


class RequestService:
    def __init__(
        self,
        ports: Ports,
        config: ServiceConfig,
        *,
        gpu_executor: Executor,
        io_executor: Executor,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        watchdog: GenerationWatchdog | None = None,
    ) -> None:
        self._p = ports
        self._config = config
        self._gpu_executor = gpu_executor
        self._watchdog = watchdog  # bounds each generation (None: unbounded)
        self._io_executor = io_executor
        self._clock = clock
        self._junk = JunkAuditBudget()
        # request_ids this process is working on: a duplicate delivery waits its turn.
        self._in_progress: set[str] = set()

    async def _io(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io_executor, partial(fn, *args, **kwargs))

    async def _gpu(self, fn: Callable[..., T], /, *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._gpu_executor, partial(fn, *args))

    async def _generate(self, specs: list[ImageSpec]) -> list[RawImage]:
        """The engine on the GPU thread, within its time limit when there is a watchdog:
        past it, GenerationTimeoutError (FATAL) makes the worker exit and requeue."""
        if self._watchdog is None:
            return await self._gpu(self._p.engine.generate, specs)
        return await self._watchdog.run(self._gpu_executor, self._p.engine.generate, specs)

    async def _timed(self, job: _Job, phase: str, awaitable: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            job.timings[phase] = round(
                job.timings.get(phase, 0.0) + time.perf_counter() - started, 6
            )

    def _audit(self, job: _Job, event_type: str, payload: Mapping[str, Any]) -> None:
        # Buffered and written a few at a time (_flush): every audit append takes the
        # chain's single lock and a commit, which made it the control plane's largest
        # cost when each event was its own transaction (bench/NOTES.md).
        job.pending_audit.append(
            AuditRecord(job.request.request_id, event_type, job.principal, payload)
        )

    async def _flush(self, job: _Job) -> None:
        if job.pending_audit:
            records, job.pending_audit = job.pending_audit, []
            await self._io(self._p.audit.append_many, records)

    async def handle(
        self, body: bytes, *, principal: str | None, routed_as: Priority | None = None
    ) -> Outcome:
        """Answer one delivery. Raises only errors with RETRY or FATAL disposition.

        `routed_as`: the priority queue the delivery came from. It must agree with the
        request's `priority`, which the policy checks: otherwise a bulk-only user could
        jump the line by publishing to the interactive routing key."""
        try:
            request = decode_request(body, max_bytes=self._config.max_body_bytes)
            if routed_as is not None and request.priority is not routed_as:
                raise InvalidRequestError(
                    f"priority: {request.priority.value!r} does not match the routing key "
                    f"{routed_as.value!r} it was published with"
                )
        except InvalidRequestError as exc:
            return await self._refuse_message(body, exc, principal=principal)
        if not principal:
            error = RequestRejectedError(
                "the message carries no AMQP user_id; publishers must set it",
                reason="UNAUTHENTICATED_PUBLISHER",
            )
            return await self._refuse_message(body, error, principal=None)

        if request.request_id in self._in_progress:
            raise JobBusyError(f"request {request.request_id!r} is being processed here")
        self._in_progress.add(request.request_id)
        try:
            return await self._handle_valid(request, principal, body)
        finally:
            self._in_progress.discard(request.request_id)

    async def _handle_valid(
        self, request: GenerationRequest, principal: str, body: bytes
    ) -> Outcome:
        digest = payload_digest(request)
        authorized = await self._screen(request, await self._authorize(request, principal))
        admitted = await self._admit_first_delivery(request, principal, digest, authorized)
        if admitted is not None:
            job, auth = admitted
            return await self._run(job, lambda: self._execute(job, auth))
        return await self._begin_and_serve(request, principal, digest, authorized, body)

    async def _authorize(self, request: GenerationRequest, principal: str) -> _Authorized:
        started = time.perf_counter()
        try:
            outcome: Authorization | ZImageError = await self._io(
                self._p.authorizer.authorize, principal=principal, on_behalf_of=request.on_behalf_of
            )
        except ZImageError as exc:
            outcome = exc
        return _Authorized(outcome, round(time.perf_counter() - started, 6))

    async def _screen(self, request: GenerationRequest, authorized: _Authorized) -> _Authorized:
        """The admission checks of an authorized request, made once per delivery before
        the ledger is touched: its role limits, then what each plugin must accept (a
        post-processor's request options, a prompt filter's verdict). A refusal is
        recorded as the request's outcome; nothing is reserved for it."""
        if isinstance(authorized.outcome, ZImageError):
            return authorized
        auth = authorized.outcome
        try:
            check_limits(request, auth)
            for name, processor in self._p.plugins.postprocessors:
                validate = getattr(processor, "validate_request", None)
                if validate is not None:
                    await self._plugin_call(name, "postprocessor", validate, request)
            who = PromptSubject(auth.subject, auth.principal, auth.roles)
            for name, prompt_filter in self._p.plugins.prompt_filters:
                refusal = await self._plugin_call(
                    name, "prompt_filter", prompt_filter.check, request, who
                )
                if refusal is not None:
                    raise PromptRefusedError(refusal.message, plugin=name, rule_id=refusal.rule_id)
        except ZImageError as exc:
            return replace(authorized, refusal=exc)
        return authorized

    async def _plugin_call(self, name: str, stage: str, fn: Callable[..., T], /, *args: Any) -> T:
        """A plugin's call on the I/O pool within the stage's time limit. Its refusal of
        the request (RequestRejectedError) stands; anything else it raises, or running
        past the limit, is PLUGIN_FAILED naming it. A call past its limit cannot be
        stopped (a thread): its result is ignored."""
        try:
            return await asyncio.wait_for(self._io(fn, *args), self._config.plugin_timeout_s)
        except RequestRejectedError:
            raise
        except TimeoutError:
            cause = f"timed out after {self._config.plugin_timeout_s:g}s"
        except Exception as exc:  # a plugin's failure is the request's, never the worker's
            cause = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("plugin %s (%s) failed: %s", name, stage, cause)
        raise PluginFailedError(name, stage, cause)

    async def _begin_and_serve(
        self,
        request: GenerationRequest,
        principal: str,
        digest: str,
        authorized: _Authorized,
        body: bytes,
    ) -> Outcome:
        begin = await self._io(
            self._p.jobs.begin,
            request_id=request.request_id,
            payload_sha256=digest,
            principal=principal,
            on_behalf_of=request.on_behalf_of,
            worker_id=self._config.worker_id,
        )
        foreign_again = begin.kind is BeginKind.FOREIGN and is_scoped_key(request.request_id)
        if begin.kind is BeginKind.CONFLICT or foreign_again:
            # The id is another request of this publisher's: answered without it, and
            # never written into its trail.
            error = RequestRejectedError(
                "request_id was already used by you for a different request",
                reason="REQUEST_ID_CONFLICT",
            )
            return await self._refuse_message(body, error, principal=principal)
        if begin.kind is BeginKind.FOREIGN and not is_scoped_key(request.request_id):
            return await self._serve_scoped(request, principal, body)
        if begin.kind is BeginKind.BUSY:
            raise JobBusyError(f"request {request.request_id!r} is being processed elsewhere")
        if begin.kind is BeginKind.TERMINAL:
            assert begin.result is not None
            stored = GenerationResult.model_validate(begin.result)
            if begin.cancelled_on_arrival:
                stored = await self._adopt_cancelled(request, principal, digest, stored)
            return Outcome(stored, republished=True)

        job = _Job(
            request=request,
            principal=principal,
            payload_sha256=digest,
            attempt=begin.attempts,
            created_at=begin.created_at or self._clock(),
        )
        self._audit(job, "received", self._received_payload(job))
        limit = self._config.max_job_attempts
        if limit and begin.attempts > limit:
            return await self._give_up(job, limit)
        return await self._run(job, lambda: self._serve(job, authorized))

    async def _serve_scoped(
        self, request: GenerationRequest, principal: str, body: bytes
    ) -> Outcome:
        """The id holds another publisher's request: this one is the ledger's under a key
        of its own (`ids.scoped_key`), and answered under the id the client gave. So an
        id cannot be squatted by using it first; each publisher's ids are its own."""
        key = scoped_key(request.request_id, principal)
        scoped = request.model_copy(update={"request_id": key})
        outcome = await self._handle_valid(scoped, principal, body)
        return _answered_as(outcome, request.request_id, key)

    async def _ledger_request(
        self, request: GenerationRequest, principal: str
    ) -> GenerationRequest:
        """The request as the ledger keys it for `principal` (see `_serve_scoped`)."""
        owner = await self._io(self._p.jobs.owner, request.request_id)
        if owner is None or owner == principal:
            return request
        return request.model_copy(update={"request_id": scoped_key(request.request_id, principal)})

    async def _adopt_cancelled(
        self, request: GenerationRequest, principal: str, digest: str, stored: GenerationResult
    ) -> GenerationResult:
        """A request its publisher cancelled before it arrived: the cancel's row becomes
        this request's, with a result that carries its subject and labels like any, and
        its trail (received, then cancelled) is written by the delivery that adopts it."""
        result = stored.model_copy(
            update={
                "request_id": request.request_id,
                "on_behalf_of": request.on_behalf_of,
                "labels": dict(request.labels),
            }
        )
        adopted = await self._io(
            self._p.jobs.adopt_cancelled,
            request.request_id,
            payload_sha256=digest,
            on_behalf_of=request.on_behalf_of,
            result=result.model_dump(mode="json", by_alias=True),
        )
        if not adopted:  # another delivery of it adopted the row first: its result
            ended = await self._io(self._p.jobs.terminal_result, request.request_id)
            return GenerationResult.model_validate(ended) if ended is not None else result
        job = _Job(request, principal, digest, attempt=1, created_at=self._clock())
        self._audit(job, "received", self._received_payload(job))
        self._audit(
            job,
            "cancelled",
            {"user": request.on_behalf_of, "reason": "CANCELLED", "before_arrival": True},
        )
        await self._flush(job)
        return result

    async def _admit_first_delivery(
        self,
        request: GenerationRequest,
        principal: str,
        digest: str,
        authorized: _Authorized,
    ) -> tuple[_Job, Authorization] | None:
        """The common case in one ledger transaction instead of two: a first delivery,
        authorized, within its limits and its quota, becomes a running job with its
        reservation and audit trail so far. None (nothing written) for anything else:
        the step-by-step path (`_begin_and_serve`) then decides and records it, the
        authorization's error included."""
        job = _Job(
            request=request,
            principal=principal,
            payload_sha256=digest,
            attempt=1,
            created_at=self._clock(),
        )
        job.timings["authorize"] = authorized.seconds
        try:
            auth = authorized.admitted()
            self._check_not_expired(job)
        except ZImageError:
            return None
        self._audit(job, "received", self._received_payload(job))
        self._audit(job, "authorized", authorized_payload(auth))
        admitted = await self._timed(
            job,
            "reserve",
            self._io(
                self._p.ledger.admit_new,
                job=NewJob(
                    request.request_id,
                    digest,
                    principal,
                    request.on_behalf_of,
                    self._config.worker_id,
                ),
                authorization=auth,
                images=request.num_images,
                audit=[*job.pending_audit, quota_reserved(job)],
            ),
        )
        if not admitted:
            return None
        job.reserved = True
        job.pending_audit = []
        return job, auth

    async def _run(self, job: _Job, work: Callable[[], Awaitable[GenerationResult]]) -> Outcome:
        """Run an admitted (or to-be-admitted) job with its heartbeat; a refusal or a
        failure ends it here, a RETRY or FATAL error propagates after its audit flush."""
        heartbeat = (
            asyncio.create_task(self._keep_alive(job.request.request_id))
            if self._config.heartbeat_s > 0
            else None
        )
        try:
            result = await work()
        except ZImageError as exc:
            if exc.disposition in (Disposition.RETRY, Disposition.FATAL):
                with suppress(ZImageError):  # the ledger may be what is down
                    await self._flush(job)
                raise
            result = await self._finish_unsuccessful(job, exc)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        return Outcome(result)

    async def _give_up(self, job: _Job, limit: int) -> Outcome:
        """End a request that workers keep dying on, without running it again. An
        earlier start may hold a reservation and may have stored objects: both are
        undone (release and discard are no-ops where there is nothing)."""
        job.reserved = job.store_started = True
        error = AttemptsExhaustedError(
            f"request started {job.attempt} times, more than worker.max_job_attempts = "
            f"{limit}: workers were lost while running it (it may crash them); not retried"
        )
        result = await self._finish_unsuccessful(job, error)
        return Outcome(result, dead_letter=True)

    async def _keep_alive(self, request_id: str) -> None:
        """Heartbeat while this worker holds the job: a crashed worker's job is taken
        over after `job_busy_s`, a live one's never, however long it generates."""
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            try:
                owned = await self._io(
                    self._p.ledger.heartbeat, request_id, worker_id=self._config.worker_id
                )
            except Exception as exc:  # a missed beat is retried, never fatal
                log.warning("heartbeat for %s failed: %s", request_id, exc)
                continue
            if not owned:
                log.warning("request %s is no longer this worker's (taken over)", request_id)
                return

    async def _refuse_message(
        self, body: bytes, error: RequestRejectedError, *, principal: str | None
    ) -> Outcome:
        """A message that is not a request of the ledger (invalid, or without a
        publisher), answered and dead-lettered with a clear reason.

        It never speaks for, or writes into, a request id: anyone can publish junk under
        anyone's id, so the answer has `request_id` "" and names the id it claimed in
        `claimed_request_id`, and the trail is a `denied` event under
        `unidentified-<sha256 of the bytes>` (junk_audit bounds how many), never an
        event of that id. Nothing is claimed, so no id can be squatted with junk; the
        same bytes get the same answer, and a later valid request may use the id."""
        document = read_json_object(body, max_bytes=CLAIM_READ_LIMIT_BYTES)
        claimed = peek_request_id(body, max_bytes=CLAIM_READ_LIMIT_BYTES)
        await self._audit_unidentified(body, error, principal=principal, claimed=claimed)
        result = rejected("", error).model_copy(
            update={"claimed_request_id": claimed, **readable_context(document)}
        )
        return Outcome(result, dead_letter=True)

    async def _audit_unidentified(
        self,
        body: bytes,
        error: RequestRejectedError,
        *,
        principal: str | None,
        claimed: str | None,
    ) -> None:
        """A message answered without a request id still leaves a trail: a `denied` event
        under `unidentified-<sha256 of the bytes>` (the same bytes, the same id), naming
        who published it, why it was refused and the id it claimed, if any; past the
        publisher's budget (junk_audit), only counted for its window's summary."""
        who = principal or "unauthenticated"
        now = time.time()
        summaries = self._junk.take_summaries(now=now)
        if summaries:
            await self._write_junk_summaries(summaries)
        if not self._junk.admit(who, error.reason, now=now):
            return
        digest = hashlib.sha256(body).hexdigest()
        await self._io(
            self._p.audit.append,
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

    async def flush_junk_summaries(self, *, all_windows: bool = False) -> None:
        """Write the summaries of closed junk windows (the worker calls this periodically
        and at shutdown, so a count is written even when the junk stops)."""
        summaries = self._junk.take_summaries(now=time.time(), all_windows=all_windows)
        if summaries:
            await self._write_junk_summaries(summaries)

    async def _write_junk_summaries(self, summaries: list[JunkSummary]) -> None:
        records = [
            AuditRecord(s.request_id, SUMMARY_EVENT, s.publisher, s.payload()) for s in summaries
        ]
        await self._io(self._p.audit.append_many, records)

    def _received_payload(self, job: _Job) -> dict[str, Any]:
        # Keys the audit index understands (user, principal, labels, prompt, ...); the
        # prompt retention policy (keep / hash only / redact after N days) applies there.
        request = job.request
        return {
            "user": request.on_behalf_of,
            "principal": job.principal,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "labels": dict(request.labels),
            "parameters": request.model_dump(
                mode="json", exclude={"prompt", "negative_prompt", "labels"}, by_alias=True
            ),
            "payload_sha256": job.payload_sha256,
            "attempt": job.attempt,
        }

    async def record_published(
        self, result: GenerationResult, *, principal: str, ledger_key: str | None = None
    ) -> None:
        """Called by the worker once the broker confirmed the result."""
        if not result.request_id:
            return  # not a request of the ledger: its trail is its `unidentified-` event
        await self._io(
            self._p.audit.append,
            request_id=ledger_key or result.request_id,
            event_type="published",
            actor=principal,
            payload={"status": result.status.value, "reason": result.reason},
        )

    async def hand_to_sinks(
        self, result: GenerationResult, *, ledger_key: str | None = None
    ) -> bool:
        """Queue a published result for the result sinks (webhooks). Called after the
        broker confirmed it and before the delivery is acked: if the ledger cannot take
        it, this raises and the delivery is requeued, so no result misses its sinks
        (the republish enqueues nothing twice). A result that is no request's (request_id
        "") has no ledger key to deliver under and goes to the AMQP results only.
        True when something was queued (the dispatcher may run now)."""
        if self._p.outbox is None or not result.request_id:
            return False
        # The event as published on AMQP (to_json_bytes: aliases, no nulls): one shape.
        event = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        await self._io(self._p.outbox.enqueue_result, ledger_key or result.request_id, event)
        return True

    async def release_after_retries(
        self, body: bytes, *, principal: str, error: ZImageError
    ) -> Outcome:
        """The retry budget is spent: end the request `failed`, releasing its reservation."""
        client_request = decode_request(body, max_bytes=self._config.max_body_bytes)
        request = await self._ledger_request(client_request, principal)
        job = _Job(
            request=request,
            principal=principal,
            payload_sha256=payload_digest(request),
            attempt=0,
            created_at=self._clock(),  # not the ledger's: the maintenance sweep discards
            reserved=True,
            store_started=True,  # unknown here: an earlier attempt may have uploaded
        )
        result = await self._finish_unsuccessful(
            job, error, status=Status.FAILED, discard_now=False
        )
        return _answered_as(Outcome(result), client_request.request_id, request.request_id)

    async def _finish_unsuccessful(
        self,
        job: _Job,
        error: ZImageError,
        *,
        status: Status | None = None,
        discard_now: bool = True,
    ) -> GenerationResult:
        if status is None:
            status = ending_status(error, running=job.reserved)  # reserved: it runs
        result = rejected(job.request.request_id, error, status=status).model_copy(
            update={
                "on_behalf_of": job.request.on_behalf_of,
                "labels": dict(job.request.labels),
                "timings_s": dict(job.timings),
            }
        )
        # The ledger and the trail say what the result says; an internal error's own
        # reason and text are kept in the trail, for operators.
        reason = result.reason or error.reason
        event = "denied" if status is Status.REJECTED else status.value
        self._audit(job, event, _ending_payload(job.request, error, reason))
        try:
            await self._io(
                self._p.ledger.conclude,
                request_id=job.request.request_id,
                status=status.value,
                reason=reason,
                result=result.model_dump(mode="json", by_alias=True),
                release=job.reserved,
                audit=list(job.pending_audit),
                discard_outputs=job.store_started,
                release_event=AuditRecord(
                    job.request.request_id, "quota_released", job.principal, {"reason": reason}
                ),
            )
        except InternalStateError:
            ended = await self._ended_otherwise(job)
            if ended is None:
                raise
            return ended
        job.pending_audit = []
        if job.store_started and discard_now:
            await self._discard_outputs(job)
        return result

    async def _ended_otherwise(self, job: _Job) -> GenerationResult | None:
        """The stored result of a request that ended another way while this delivery
        was deciding (its publisher cancelled it while it waited: the ledger refuses
        to end it twice), or None. Its trail keeps what this delivery saw, less the
        ending that did not happen."""
        request = job.request
        ended = await self._io(self._p.jobs.terminal_result, request.request_id)
        if ended is None:
            return None
        job.pending_audit = job.pending_audit[:-1]
        await self._flush(job)
        result = GenerationResult.model_validate(ended)
        if result.status is Status.CANCELLED and not result.labels and request.labels:
            # The cancel could not know the labels: the stored result gets them, so this
            # answer and any republish of it say the same thing.
            result = result.model_copy(
                update={"on_behalf_of": request.on_behalf_of, "labels": dict(request.labels)}
            )
            payload = result.model_dump(mode="json", by_alias=True)
            await self._io(self._p.jobs.complete_cancelled, request.request_id, payload)
        return result

    async def _discard_outputs(self, job: _Job) -> None:
        """Delete what the failed upload left, now if the store answers; otherwise the
        ledger keeps the discard queued and the maintenance sweep retries it. Failing
        here must not change the request's outcome, which is already committed."""
        request_id = job.request.request_id
        try:
            keys = await self._io(
                self._p.store.discard, request_id=request_id, created_at=job.created_at
            )
            await self._io(
                self._p.ledger.outputs_discarded,
                request_id,
                keys=keys,
                actor=f"worker:{self._config.worker_id}",
            )
        except ZImageError as exc:
            log.warning("objects of %s left for the maintenance sweep: %s", request_id, exc)

    def _check_not_expired(self, job: _Job) -> None:
        expires_at = job.request.expires_at
        if expires_at is not None and self._clock() >= expires_at:
            raise RequestExpiredError(f"the request expired at {expires_at.isoformat()}")

    async def _serve(self, job: _Job, authorized: _Authorized) -> GenerationResult:
        request = job.request
        self._check_not_expired(job)
        job.timings["authorize"] = authorized.seconds
        auth = authorized.admitted()
        self._audit(job, "authorized", authorized_payload(auth))
        self._check_not_expired(job)
        # One transaction: reserved, running and its audit trail so far, or nothing (a
        # quota refusal leaves the pending events for the denial to record).
        await self._timed(
            job,
            "reserve",
            self._io(
                self._p.ledger.admit,
                request_id=request.request_id,
                authorization=auth,
                images=request.num_images,
                audit=[*job.pending_audit, quota_reserved(job)],
            ),
        )
        job.reserved = True
        job.pending_audit = []
        return await self._execute(job, auth)

    async def _execute(self, job: _Job, auth: Authorization) -> GenerationResult:
        """Generate, encode, store and charge an admitted job."""
        request = job.request
        specs = image_specs(request, effective_seed(request, job.payload_sha256))
        raw_images = await self._timed(job, "generate", self._generate(specs))
        model = self._p.engine.identity
        self._audit(job, "generated", generated_payload(request, model, raw_images, job.timings))
        encoded = await self._timed(
            job,
            "encode",
            asyncio.gather(
                *(
                    self._io(
                        self._p.encoder.encode,
                        raw,
                        request=request,
                        model=model,
                        created_at=job.created_at,
                    )
                    for raw in raw_images
                )
            ),
        )
        derived = await self._timed(
            job, "postprocess", self._postprocess(job, raw_images, encoded, model)
        )
        audit_record = audit_record_of(
            request,
            payload_sha256=job.payload_sha256,
            auth=auth,
            model=model,
            seeds=[i.seed for i in encoded],
            timings=job.timings,
            worker_id=self._config.worker_id,
            attempt=job.attempt,
        )
        job.store_started = True
        outputs = await self._timed(
            job,
            "store",
            self._io(
                self._p.store.store,
                request=request,
                created_at=job.created_at,
                images=encoded,
                audit_record=audit_record,
                first_attempt=job.attempt == 1,
                derived=derived,
            ),
        )
        self._audit(job, "stored", stored_payload(outputs, derived))
        self._audit(job, "quota_committed", {"images": len(encoded)})
        completing = time.perf_counter()
        published: list[GenerationResult] = []

        def result_of(left: QuotaLeft) -> dict[str, Any]:
            # Called inside the ledger transaction, after the charge: the stored result
            # (republished verbatim on a redelivery) carries the quota left after it.
            job.timings["commit"] = round(time.perf_counter() - completing, 6)
            result = succeeded_result(
                request,
                outputs=outputs,
                encoded=encoded,
                model=model,
                left=left,
                timings=job.timings,
                finished_at=self._clock(),
                derived=derived,
            )
            published[:] = [result]
            return result.model_dump(mode="json", by_alias=True)

        await self._io(
            self._p.ledger.complete,
            request_id=request.request_id,
            authorization=auth,
            images=len(encoded),
            audit=list(job.pending_audit),
            result_of=result_of,
        )
        job.pending_audit = []
        return published[-1]

    async def _postprocess(
        self,
        job: _Job,
        raw_images: list[RawImage],
        encoded: list[EncodedImage],
        model: ModelIdentity,
    ) -> list[EncodedDerived]:
        """Each post-processor's images (on the I/O pool, off the GPU thread), marked with
        the provenance of the image they come from."""
        if not self._p.plugins.postprocessors:
            return []
        request = job.request
        sources = [
            SourceImage(
                index=index,
                pixels=raw.pixels,
                data=image.data,
                format=image.format.value,
                width=image.width,
                height=image.height,
                seed=image.seed,
                sha256=hashlib.sha256(image.data).hexdigest(),
            )
            for index, (raw, image) in enumerate(zip(raw_images, encoded, strict=True))
        ]
        marked: list[EncodedDerived] = []
        for name, processor in self._p.plugins.postprocessors:
            made = await self._plugin_call(
                name, "postprocessor", processor.process, request, sources
            )
            checked = _checked_derived(name, made, len(sources))
            marked += await asyncio.gather(
                *(
                    self._io(
                        self._p.encoder.mark_derived,
                        image,
                        source=encoded[image.source_index],
                        request=request,
                        model=model,
                        created_at=job.created_at,
                        plugin=name,
                    )
                    for image in checked
                )
            )
        self._audit(
            job,
            "postprocessed",
            {"renditions": [[d.plugin, d.source_index, d.name, d.format] for d in marked]},
        )
        return marked

    async def cancel(self, request_id: str, *, principal: str) -> CancelOutcome:
        decision = await self._io(self._p.jobs.cancel, request_id, principal=principal)
        if decision.outcome is CancelOutcome.CANCELLED:
            # The request had arrived (its id is the canceller's): its trail says so now.
            # A `pending` cancel writes its trail when the request arrives, under it.
            await self._io(
                self._p.audit.append,
                request_id=decision.key,
                event_type="cancelled",
                actor=principal,
                payload={"user": principal, "reason": "CANCELLED"},
            )
        return decision.outcome


def _checked_derived(plugin: str, made: object, sources: int) -> list[DerivedImage]:
    """A post-processor's output, refused as PLUGIN_FAILED unless every item is a
    DerivedImage of a real source, with a name that can be a key segment (unique per
    source) and a known format: nothing a plugin returns reaches a key unchecked."""
    if not isinstance(made, list) or not all(isinstance(d, DerivedImage) for d in made):
        raise PluginFailedError(
            plugin, "postprocessor", "process() did not return a list of DerivedImage"
        )
    seen: set[tuple[int, str]] = set()
    for image in made:
        problem = None
        if not 0 <= image.source_index < sources:
            problem = f"source_index {image.source_index} out of range"
        elif ".." in image.name or not DERIVED_NAME.fullmatch(image.name):
            problem = f"name {image.name!r:.80} is not a key segment"
        elif image.format not in DERIVED_FORMATS:
            problem = f"format {image.format!r:.20} is not one of {sorted(DERIVED_FORMATS)}"
        elif (image.source_index, image.name) in seen:
            problem = f"two images named {image.name!r} for image {image.source_index}"
        if problem is not None:
            raise PluginFailedError(plugin, "postprocessor", problem)
        seen.add((image.source_index, image.name))
    return made
