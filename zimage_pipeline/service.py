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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from zimage_pipeline.decoding import decode_request, peek_request_id
from zimage_pipeline.errors import (
    Disposition,
    InvalidRequestError,
    RequestRejectedError,
    ZImageError,
)
from zimage_pipeline.messages import (
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    QuotaRemaining,
    Status,
    StoredImage,
)
from zimage_pipeline.ports import (
    Audit,
    Authorization,
    Authorizer,
    BeginKind,
    Encoder,
    Engine,
    ImageSpec,
    Jobs,
    Quota,
    Store,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker must do with a delivery after the service has answered it."""

    result: GenerationResult
    dead_letter: bool = False  # the original goes to the DLQ with the reason in headers
    republished: bool = False  # answered before (redelivery or duplicate)


@dataclass(slots=True)
class Ports:
    jobs: Jobs
    authorizer: Authorizer
    quota: Quota
    engine: Engine
    encoder: Encoder
    store: Store
    audit: Audit


@dataclass(slots=True)
class ServiceConfig:
    worker_id: str
    max_body_bytes: int = 64 * 1024


@dataclass(slots=True)
class _Job:
    request: GenerationRequest
    principal: str
    payload_sha256: str
    attempt: int
    created_at: datetime
    timings: dict[str, float] = field(default_factory=dict)
    authorization: Authorization | None = None
    reserved: bool = False


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


def rejected(
    request_id: str, error: ZImageError, *, status: Status = Status.REJECTED
) -> GenerationResult:
    return GenerationResult(
        request_id=request_id,
        status=status,
        reason=error.reason,
        message=str(error),
        finished_at=datetime.now(UTC),
    )


class RequestService:
    def __init__(
        self,
        ports: Ports,
        config: ServiceConfig,
        *,
        gpu_executor: Executor,
        io_executor: Executor,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._p = ports
        self._config = config
        self._gpu_executor = gpu_executor
        self._io_executor = io_executor
        self._clock = clock

    async def _io(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io_executor, partial(fn, *args, **kwargs))

    async def _gpu(self, fn: Callable[..., T], /, *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._gpu_executor, partial(fn, *args))

    async def _timed(self, job: _Job, phase: str, awaitable: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            job.timings[phase] = round(
                job.timings.get(phase, 0.0) + time.perf_counter() - started, 6
            )

    async def _audit(self, job: _Job, event_type: str, payload: Mapping[str, Any]) -> None:
        await self._io(
            self._p.audit.append,
            request_id=job.request.request_id,
            event_type=event_type,
            actor=job.principal,
            payload=payload,
        )

    async def handle(self, body: bytes, *, principal: str | None) -> Outcome:
        """Answer one delivery. Raises only errors with RETRY or FATAL disposition."""
        try:
            request = decode_request(body, max_bytes=self._config.max_body_bytes)
        except InvalidRequestError as exc:
            return Outcome(rejected(peek_request_id(body) or "", exc), dead_letter=True)
        if not principal:
            error = RequestRejectedError(
                "the message carries no AMQP user_id; publishers must set it",
                reason="UNAUTHENTICATED_PUBLISHER",
            )
            return Outcome(rejected(request.request_id, error), dead_letter=True)

        digest = payload_digest(request)
        begin = await self._io(
            self._p.jobs.begin,
            request_id=request.request_id,
            payload_sha256=digest,
            principal=principal,
            on_behalf_of=request.on_behalf_of,
            worker_id=self._config.worker_id,
        )
        if begin.kind is BeginKind.CONFLICT:
            error = RequestRejectedError(
                f"request_id {request.request_id!r} was already used for a different request",
                reason="REQUEST_ID_CONFLICT",
            )
            return Outcome(rejected(request.request_id, error), dead_letter=True)
        if begin.kind is BeginKind.TERMINAL:
            assert begin.result is not None
            return Outcome(GenerationResult.model_validate(begin.result), republished=True)

        job = _Job(
            request=request,
            principal=principal,
            payload_sha256=digest,
            attempt=begin.attempts,
            created_at=begin.created_at or self._clock(),
        )
        await self._audit(job, "received", self._received_payload(job))
        try:
            result = await self._serve(job)
        except ZImageError as exc:
            if exc.disposition in (Disposition.RETRY, Disposition.FATAL):
                raise
            result = await self._finish_unsuccessful(job, exc)
        return Outcome(result)

    def _received_payload(self, job: _Job) -> dict[str, Any]:
        # The full request goes to the audit trail; its retention policy (keep, hash only,
        # redact after N days) applies there, not here.
        request = job.request.model_dump(mode="json", by_alias=True)
        return {"request": request, "payload_sha256": job.payload_sha256, "attempt": job.attempt}

    async def release_after_retries(
        self, body: bytes, *, principal: str, error: ZImageError
    ) -> Outcome:
        """The retry budget is spent: end the request `failed`, releasing its reservation."""
        request = decode_request(body, max_bytes=self._config.max_body_bytes)
        job = _Job(
            request=request,
            principal=principal,
            payload_sha256=payload_digest(request),
            attempt=0,
            created_at=self._clock(),
            reserved=True,
        )
        return Outcome(await self._finish_unsuccessful(job, error, status=Status.FAILED))

    async def _finish_unsuccessful(
        self, job: _Job, error: ZImageError, *, status: Status | None = None
    ) -> GenerationResult:
        if status is None:
            status = Status.REJECTED if error.disposition is Disposition.REJECT else Status.FAILED
            status = _STATUS_BY_REASON.get(error.reason, status)
        if job.reserved:
            await self._io(self._p.quota.release, job.request.request_id, error.reason)
            await self._audit(job, "quota_released", {"reason": error.reason})
        result = rejected(job.request.request_id, error, status=status).model_copy(
            update={
                "on_behalf_of": job.request.on_behalf_of,
                "labels": dict(job.request.labels),
                "timings_s": dict(job.timings),
            }
        )
        event = "denied" if status is Status.REJECTED else status.value
        await self._audit(job, event, {"reason": error.reason, "message": str(error)})
        await self._io(
            self._p.jobs.finish,
            job.request.request_id,
            status.value,
            reason=error.reason,
            result=result.model_dump(mode="json", by_alias=True),
        )
        return result

    def _check_not_expired(self, job: _Job) -> None:
        expires_at = job.request.expires_at
        if expires_at is not None and self._clock() >= expires_at:
            raise RequestExpiredError(f"the request expired at {expires_at.isoformat()}")

    async def _serve(self, job: _Job) -> GenerationResult:
        request = job.request
        self._check_not_expired(job)
        auth = await self._timed(
            job,
            "authorize",
            self._io(
                self._p.authorizer.authorize,
                principal=job.principal,
                on_behalf_of=request.on_behalf_of,
            ),
        )
        job.authorization = auth
        check_limits(request, auth)
        await self._io(
            self._p.jobs.mark, request.request_id, "authorized", roles_snapshot=auth.roles_snapshot
        )
        await self._audit(
            job, "authorized", {"subject": auth.subject, "roles": dict(auth.roles_snapshot)}
        )

        await self._timed(
            job,
            "reserve",
            self._io(
                self._p.quota.reserve,
                request_id=request.request_id,
                authorization=auth,
                images=request.num_images,
            ),
        )
        job.reserved = True
        await self._audit(job, "quota_reserved", {"images": request.num_images})

        self._check_not_expired(job)
        await self._io(self._p.jobs.mark, request.request_id, "running")
        base_seed = effective_seed(request, job.payload_sha256)
        specs = [
            ImageSpec(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=request.width,
                height=request.height,
                steps=request.steps,
                guidance_scale=request.guidance_scale,
                seed=(base_seed + index) % (MAX_SEED + 1),
            )
            for index in range(request.num_images)
        ]
        raw_images = await self._timed(job, "generate", self._gpu(self._p.engine.generate, specs))
        model = self._p.engine.identity
        await self._audit(
            job,
            "generated",
            {
                "model": {
                    "name": model.name,
                    "revision": model.revision,
                    "weights_sha256": model.weights_sha256,
                },
                "seeds": [image.seed for image in raw_images],
                "parameters": {
                    "width": request.width,
                    "height": request.height,
                    "steps": request.steps,
                    "guidance_scale": request.guidance_scale,
                },
                "generate_s": job.timings.get("generate"),
            },
        )
        encoded = await self._timed(
            job,
            "encode",
            asyncio.gather(
                *(
                    self._io(self._p.encoder.encode, raw, request=request, model=model)
                    for raw in raw_images
                )
            ),
        )
        audit_record = self._audit_record(
            job, auth, model_name=model.name, seeds=[i.seed for i in encoded]
        )
        outputs = await self._timed(
            job,
            "store",
            self._io(
                self._p.store.store,
                request=request,
                created_at=job.created_at,
                images=encoded,
                audit_record=audit_record,
            ),
        )
        await self._audit(
            job,
            "stored",
            {
                "objects": [
                    {"key": o.key, "sha256": o.sha256, "bytes": o.size} for o in outputs.images
                ],
                "audit_record_key": outputs.audit_record_key,
            },
        )
        await self._timed(
            job, "commit", self._io(self._p.quota.commit, request.request_id, len(encoded))
        )
        await self._audit(job, "quota_committed", {"images": len(encoded)})
        left = await self._io(self._p.quota.remaining, auth)

        result = GenerationResult(
            request_id=request.request_id,
            status=Status.SUCCEEDED,
            on_behalf_of=request.on_behalf_of,
            images=[
                StoredImage(
                    bucket=ref.bucket,
                    key=ref.key,
                    version_id=ref.version_id,
                    sha256=ref.sha256,
                    bytes=ref.size,
                    width=image.width,
                    height=image.height,
                    format=image.format,
                    seed=image.seed,
                    url=ref.url,
                )
                for ref, image in zip(outputs.images, encoded, strict=True)
            ],
            audit_record_key=outputs.audit_record_key,
            timings_s=dict(job.timings),
            model=ModelInfo(
                name=model.name, revision=model.revision, weights_sha256=model.weights_sha256
            ),
            quota_remaining=QuotaRemaining(day=left.day, month=left.month),
            labels=dict(request.labels),
            finished_at=self._clock(),
        )
        await self._io(
            self._p.jobs.finish,
            request.request_id,
            Status.SUCCEEDED.value,
            reason=None,
            result=result.model_dump(mode="json", by_alias=True),
        )
        return result

    def _audit_record(
        self, job: _Job, auth: Authorization, *, model_name: str, seeds: list[int]
    ) -> dict[str, Any]:
        return {
            "request": job.request.model_dump(mode="json", by_alias=True),
            "payload_sha256": job.payload_sha256,
            "principal": job.principal,
            "subject": auth.subject,
            "decision": "authorized",
            "roles_snapshot": dict(auth.roles_snapshot),
            "quota": {"reserved": job.request.num_images},
            "model": model_name,
            "seeds": seeds,
            "timings_s": dict(job.timings),
            "worker_id": self._config.worker_id,
            "attempt": job.attempt,
        }

    async def cancel(self, request_id: str, *, principal: str) -> bool:
        return await self._io(self._p.jobs.cancel, request_id, principal=principal)


class RequestExpiredError(ZImageError):
    disposition = Disposition.FAIL
    reason = "EXPIRED"


_STATUS_BY_REASON = {"EXPIRED": Status.EXPIRED, "CANCELLED": Status.CANCELLED}


def check_limits(request: GenerationRequest, auth: Authorization) -> None:
    """Enforce the subject's role limits; the message names the limit that was hit."""
    limits = auth.limits
    if not limits.generate:
        raise RequestRejectedError(
            f"{auth.subject!r} has no role that allows generating images", reason="NOT_AUTHORIZED"
        )
    problems = []
    if max(request.width, request.height) > limits.max_side:
        problems.append(f"width/height: at most {limits.max_side} px per side")
    if request.pixels > limits.max_pixels:
        problems.append(f"width*height: at most {limits.max_pixels} pixels")
    if request.num_images > limits.max_images:
        problems.append(f"num_images: at most {limits.max_images}")
    if request.steps > limits.max_steps:
        problems.append(f"steps: at most {limits.max_steps}")
    if request.format not in limits.formats:
        allowed = ", ".join(sorted(f.value for f in limits.formats))
        problems.append(f"format: one of {allowed}")
    if request.priority not in limits.priorities:
        allowed = ", ".join(sorted(p.value for p in limits.priorities))
        problems.append(f"priority: one of {allowed}")
    if problems:
        raise RequestRejectedError(
            "the request exceeds what the user's roles allow: " + "; ".join(problems),
            reason="POLICY_VIOLATION",
        )
