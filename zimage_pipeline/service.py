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
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from zimage_pipeline.adapters import NO_ADAPTERS, AdapterCatalogue
from zimage_pipeline.admission import RequestExpiredError
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.errors import (
    AttemptsExhaustedError,
    InternalStateError,
    InvalidRequestError,
    JobBusyError,
    RequestRejectedError,
    ZImageError,
)
from zimage_pipeline.ids import is_scoped_key, scoped_key
from zimage_pipeline.messages import (
    CancelOutcome,
    GenerationRequest,
    GenerationResult,
    Priority,
    Status,
    TemplateRef,
)
from zimage_pipeline.outcomes import Handling, dead_letters, ending_status, handling
from zimage_pipeline.plugins.registry import LoadedPlugins
from zimage_pipeline.ports import (
    Audit,
    AuditRecord,
    Authorization,
    Authorizer,
    BeginKind,
    Encoder,
    Engine,
    Jobs,
    Ledger,
    NewJob,
    QuotaLeft,
    ResultOutbox,
    Store,
)
from zimage_pipeline.results import (
    generated_payload,
    rejected,
    stored_payload,
    succeeded_result,
)
from zimage_pipeline.stages import store as store_stage
from zimage_pipeline.stages.generate import encode, generate
from zimage_pipeline.stages.identify import Identified, identify
from zimage_pipeline.stages.inputs import InputSource
from zimage_pipeline.stages.job import (
    Job,
    authorized_payload,
    effective_seed,
    ending_payload,
    payload_digest,
    quota_reserved,
    received_payload,
)
from zimage_pipeline.stages.postprocess import postprocess
from zimage_pipeline.stages.refuse import MessageRefusal
from zimage_pipeline.stages.runtime import Runtime, timed
from zimage_pipeline.templates.catalogue import Catalogue
from zimage_pipeline.templates.holder import EMPTY as EMPTY_CATALOGUE
from zimage_pipeline.watchdog import GenerationWatchdog

# Re-exported: the request's digest and seed are part of this module's public face.
__all__ = [
    "Outcome",
    "Ports",
    "RequestService",
    "ServiceConfig",
    "effective_seed",
    "payload_digest",
]

log = logging.getLogger(__name__)


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
    # The template catalogue as it is now (templates/holder.py); none by default.
    templates: Callable[[], Catalogue] = lambda: EMPTY_CATALOGUE
    # Where input images (image_to_image, inpaint) are read from; None: nowhere.
    inputs: InputSource | None = None
    # The LoRA adapters a request may name ([adapters.<name>]); none by default.
    adapters: AdapterCatalogue = NO_ADAPTERS


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


def _answered_as(outcome: Outcome, request_id: str, ledger_key: str) -> Outcome:
    """`outcome` of the request the ledger keys `ledger_key`, told under the client's id."""
    if ledger_key == request_id or not outcome.result.request_id:
        return outcome
    result = outcome.result.model_copy(update={"request_id": request_id})
    return replace(outcome, result=result, ledger_key=ledger_key)


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
        self._rt = Runtime(
            gpu_executor,
            io_executor,
            watchdog=watchdog,  # bounds each generation (None: unbounded)
            plugin_timeout_s=config.plugin_timeout_s,
        )
        self._refusal = MessageRefusal(self._rt, ports.audit)
        self._clock = clock
        # request_ids this process is working on: a duplicate delivery waits its turn.
        self._in_progress: set[str] = set()

    async def _flush(self, job: Job) -> None:
        if job.pending_audit:
            records, job.pending_audit = job.pending_audit, []
            await self._rt.io(self._p.audit.append_many, records)

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
        # The digest of what the client sent, not of what its template renders to now: a
        # redelivery is the same request whatever the catalogue says by then.
        digest = payload_digest(request)
        catalogue = self._p.templates()  # once per delivery: a reload does not split it
        authorized = await self._identify(catalogue, request, principal)
        job = Job(
            authorized.request,
            principal,
            digest,
            attempt=1,
            created_at=self._clock(),
            inputs=authorized.inputs,
        )
        if authorized.admissible() and not self._expired(job):
            # The common case, a first delivery that will run, in one ledger transaction
            # (the job, its reservation and its trail so far) instead of two. None when
            # the id is not new or the quota refuses: nothing was written, and the
            # step-by-step path below decides and records it.
            job.record("received", received_payload(job))
            auth = await self._admit(job, authorized, new=True)
            if auth is not None:
                return await self._run(job, lambda: self._execute(job, auth))
        return await self._begin_and_serve(request, principal, digest, authorized, body, catalogue)

    async def _identify(
        self, catalogue: Catalogue, request: GenerationRequest, principal: str
    ) -> Identified:
        return await identify(
            self._rt,
            self._p.authorizer,
            self._p.plugins,
            catalogue,
            self._p.inputs,
            request,
            principal,
            adapters=self._p.adapters,
        )

    async def _as_first_admitted(
        self,
        catalogue: Catalogue,
        request: GenerationRequest,
        principal: str,
        first: TemplateRef | None,
        authorized: Identified,
    ) -> Identified:
        """A takeover of an admitted attempt (its worker died) renders the template
        version that attempt was admitted with, not one the catalogue got since: an
        admitted request finishes under the catalogue it was admitted with, as it would
        have without the crash. A version since removed from the catalogue cannot be:
        the request then runs with the current one, and says so in the log."""
        if first is None or request.template is None:
            return authorized
        if authorized.request.template == first:
            return authorized
        try:
            catalogue.resolve(first)
        except InvalidRequestError:
            log.warning(
                "request %s: template %s@v%s of its admitted attempt is no longer in the "
                "catalogue; rendering the current version",
                request.request_id,
                first.id,
                first.version,
            )
            return authorized
        return await self._identify(
            catalogue, request.model_copy(update={"template": first}), principal
        )

    async def _begin_and_serve(
        self,
        request: GenerationRequest,
        principal: str,
        digest: str,
        authorized: Identified,
        body: bytes,
        catalogue: Catalogue,
    ) -> Outcome:
        begin = await self._rt.io(
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
                stored = await self._adopt_cancelled(authorized.request, principal, digest, stored)
            return Outcome(stored, republished=True)

        authorized = await self._as_first_admitted(
            catalogue, request, principal, begin.template, authorized
        )
        job = Job(
            request=authorized.request,  # rendered from its template, if it names one
            inputs=authorized.inputs,
            principal=principal,
            payload_sha256=digest,
            attempt=begin.attempts,
            created_at=begin.created_at or self._clock(),
        )
        job.record("received", received_payload(job))
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
        owner = await self._rt.io(self._p.jobs.owner, request.request_id)
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
        adopted = await self._rt.io(
            self._p.jobs.adopt_cancelled,
            request.request_id,
            payload_sha256=digest,
            on_behalf_of=request.on_behalf_of,
            result=result.model_dump(mode="json", by_alias=True),
        )
        if not adopted:  # another delivery of it adopted the row first: its result
            ended = await self._rt.io(self._p.jobs.terminal_result, request.request_id)
            return GenerationResult.model_validate(ended) if ended is not None else result
        job = Job(request, principal, digest, attempt=1, created_at=self._clock())
        job.record("received", received_payload(job))
        job.record(
            "cancelled",
            {"user": request.on_behalf_of, "reason": "CANCELLED", "before_arrival": True},
        )
        await self._flush(job)
        return result

    async def _run(self, job: Job, work: Callable[[], Awaitable[GenerationResult]]) -> Outcome:
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
            if handling(exc) is not Handling.ANSWER:
                with suppress(ZImageError):  # the ledger may be what is down
                    await self._flush(job)
                raise
            result = await self._finish_unsuccessful(job, exc)
            return Outcome(result, dead_letter=dead_letters(exc))
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        return Outcome(result)

    async def _give_up(self, job: Job, limit: int) -> Outcome:
        """End a request that workers keep dying on, without running it again. An
        earlier start may hold a reservation and may have stored objects: both are
        undone (release and discard are no-ops where there is nothing)."""
        job.reserved = job.store_started = True
        error = AttemptsExhaustedError(
            f"request started {job.attempt} times, more than worker.max_job_attempts = "
            f"{limit}: workers were lost while running it (it may crash them); not retried"
        )
        result = await self._finish_unsuccessful(job, error)
        return Outcome(result, dead_letter=dead_letters(error))

    async def _keep_alive(self, request_id: str) -> None:
        """Heartbeat while this worker holds the job: a crashed worker's job is taken
        over after `job_busy_s`, a live one's never, however long it generates."""
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            try:
                owned = await self._rt.io(
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
        publisher): answered under no request id and dead-lettered (stages/refuse.py)."""
        result = await self._refusal.refuse(body, error, principal=principal)
        return Outcome(result, dead_letter=dead_letters(error, ledger_request=False))

    async def flush_junk_summaries(self, *, all_windows: bool = False) -> None:
        await self._refusal.flush_summaries(all_windows=all_windows)

    async def record_published(
        self, result: GenerationResult, *, principal: str, ledger_key: str | None = None
    ) -> None:
        """Called by the worker once the broker confirmed the result."""
        if not result.request_id:
            return  # not a request of the ledger: its trail is its `unidentified-` event
        await self._rt.io(
            self._p.audit.append,
            request_id=ledger_key or result.request_id,
            event_type="published",
            actor=principal,
            payload={"status": result.status.value, "reason": result.reason},
        )

    async def hand_to_sinks(
        self,
        result: GenerationResult,
        *,
        ledger_key: str | None = None,
        publisher: str | None = None,
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
        ids = await self._rt.io(
            self._p.outbox.enqueue_result, ledger_key or result.request_id, event, publisher
        )
        return bool(ids)

    async def release_after_retries(
        self, body: bytes, *, principal: str, error: ZImageError
    ) -> Outcome:
        """The retry budget is spent: end the request `failed`, releasing its reservation."""
        client_request = decode_request(body, max_bytes=self._config.max_body_bytes)
        request = await self._ledger_request(client_request, principal)
        job = Job(
            request=request,
            principal=principal,
            payload_sha256=payload_digest(request),
            attempt=0,
            created_at=self._clock(),  # not the ledger's: the maintenance sweep discards
            reserved=True,
            store_started=True,  # unknown here: an earlier attempt may have uploaded
        )
        result = await self._finish_unsuccessful(job, error, discard_now=False)
        return _answered_as(Outcome(result), client_request.request_id, request.request_id)

    async def _finish_unsuccessful(
        self,
        job: Job,
        error: ZImageError,
        *,
        discard_now: bool = True,
    ) -> GenerationResult:
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
        job.record(event, ending_payload(job.request, error, reason))
        try:
            await self._rt.io(
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
            await store_stage.discard_outputs(
                self._rt, self._p.store, self._p.ledger, job, worker_id=self._config.worker_id
            )
        return result

    async def _ended_otherwise(self, job: Job) -> GenerationResult | None:
        """The stored result of a request that ended another way while this delivery
        was deciding (its publisher cancelled it while it waited: the ledger refuses
        to end it twice), or None. Its trail keeps what this delivery saw, less the
        ending that did not happen."""
        request = job.request
        ended = await self._rt.io(self._p.jobs.terminal_result, request.request_id)
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
            await self._rt.io(self._p.jobs.complete_cancelled, request.request_id, payload)
        return result

    def _expired(self, job: Job) -> bool:
        expires_at = job.request.expires_at
        return expires_at is not None and self._clock() >= expires_at

    def _check_not_expired(self, job: Job) -> None:
        if self._expired(job):
            assert job.request.expires_at is not None
            raise RequestExpiredError(
                f"the request expired at {job.request.expires_at.isoformat()}"
            )

    async def _admit(self, job: Job, authorized: Identified, *, new: bool) -> Authorization | None:
        """The one admission sequence: not expired, authorized and screened (else the
        error that ends it), its `authorized` event, then reserved and running with its
        trail so far in one ledger transaction. `new`: the job row is created in that
        same transaction (`admit_new`, None when it cannot be: nothing written);
        otherwise `Jobs.begin` made it and `admit` raises a quota refusal, leaving the
        pending events for the denial to record."""
        request = job.request
        self._check_not_expired(job)
        job.timings["authorize"] = authorized.seconds
        auth = authorized.admitted()
        job.record("authorized", authorized_payload(auth))
        audit = [*job.pending_audit, quota_reserved(job)]
        if new:
            admitted = await timed(
                job,
                "reserve",
                self._rt.io(
                    self._p.ledger.admit_new,
                    job=NewJob(
                        request.request_id,
                        job.payload_sha256,
                        job.principal,
                        request.on_behalf_of,
                        self._config.worker_id,
                    ),
                    authorization=auth,
                    images=request.num_images,
                    audit=audit,
                    template=request.template,
                ),
            )
            if not admitted:
                return None
        else:
            await timed(
                job,
                "reserve",
                self._rt.io(
                    self._p.ledger.admit,
                    request_id=request.request_id,
                    authorization=auth,
                    images=request.num_images,
                    audit=audit,
                    template=request.template,
                ),
            )
        job.reserved = True
        job.pending_audit = []
        return auth

    async def _serve(self, job: Job, authorized: Identified) -> GenerationResult:
        auth = await self._admit(job, authorized, new=False)
        assert auth is not None  # `admit` raises instead of answering None
        return await self._execute(job, auth)

    async def _execute(self, job: Job, auth: Authorization) -> GenerationResult:
        """Generate, encode, post-process, store and charge an admitted job."""
        rt, p, request = self._rt, self._p, job.request
        # The model as this request runs it: with its adapters (names, hashes, weights).
        model = replace(p.engine.identity, adapters=p.adapters.uses(request))
        raw_images = await timed(job, "generate", generate(rt, p.engine, job))
        job.record("generated", generated_payload(request, model, raw_images, job.timings))
        encoded = await timed(job, "encode", encode(rt, p.encoder, job, raw_images, model))
        derived = await timed(
            job,
            "postprocess",
            postprocess(rt, p.plugins, p.encoder, job, raw_images, encoded, model),
        )
        outputs = await timed(
            job,
            "store",
            store_stage.upload(
                rt,
                p.store,
                job,
                auth=auth,
                model=model,
                encoded=encoded,
                derived=derived,
                worker_id=self._config.worker_id,
            ),
        )
        job.record("stored", stored_payload(outputs, derived))
        job.record("quota_committed", {"images": len(encoded)})
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

        await self._rt.io(
            p.ledger.complete,
            request_id=request.request_id,
            authorization=auth,
            images=len(encoded),
            audit=list(job.pending_audit),
            result_of=result_of,
        )
        job.pending_audit = []
        return published[-1]

    async def cancel(self, request_id: str, *, principal: str) -> CancelOutcome:
        decision = await self._rt.io(self._p.jobs.cancel, request_id, principal=principal)
        if decision.outcome is CancelOutcome.CANCELLED:
            # The request had arrived (its id is the canceller's): its trail says so now.
            # A `pending` cancel writes its trail when the request arrives, under it.
            await self._rt.io(
                self._p.audit.append,
                request_id=decision.key,
                event_type="cancelled",
                actor=principal,
                payload={"user": principal, "reason": "CANCELLED"},
            )
        return decision.outcome
