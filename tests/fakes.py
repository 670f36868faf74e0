"""In-memory fakes of the ports, for tests of the core and of the worker's AMQP handling.

Thread-safe where the service calls them from its executors.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from zimage_pipeline.audit.chain import EVENT_TYPES
from zimage_pipeline.audit.errors import AuditError
from zimage_pipeline.engine.types import validate_spec
from zimage_pipeline.errors import DependencyUnavailable, RequestRejectedError
from zimage_pipeline.ids import scoped_key
from zimage_pipeline.messages import (
    CancelOutcome,
    GenerationRequest,
    ImageFormat,
    Priority,
    TemplateRef,
)
from zimage_pipeline.ports import (
    AuditRecord,
    Authorization,
    BeginKind,
    CancelDecision,
    EncodedDerived,
    EncodedImage,
    ImageSpec,
    InputImage,
    JobBegin,
    Limits,
    ModelIdentity,
    NewJob,
    QuotaLeft,
    RawImage,
    StoredObject,
    StoredObjectRef,
    StoredOutputs,
)
from zimage_pipeline.storage.errors import (
    ObjectConflictError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageFailedError,
)
from zimage_pipeline.wiring.outputs import generation_spec

GENEROUS = Limits(
    generate=True,
    delegate=False,
    max_pixels=2048 * 2048,
    max_side=2048,
    max_images=8,
    max_steps=50,
    formats=frozenset(ImageFormat),
    priorities=frozenset(Priority),
)


TOMBSTONE = "cancelled-before-arrival"  # the payload digest of a cancel's row (LedgerJobs)


class FakeJobs:
    """The Jobs port in memory, held to LedgerJobs by tests/integration/test_port_contracts:
    ids are per publisher (FOREIGN), a cancel may arrive before its request (a tombstone
    row), and no publisher's cancel touches another's request. With `busy_s`, an
    unfinished job another worker touched (began, or beat) less than that long ago is
    BUSY, as in the ledger; 0 (the default): a second begin takes the job over."""

    def __init__(self, *, busy_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, Any]] = {}
        self.busy_s = busy_s
        self.clock = clock

    def begin(
        self,
        *,
        request_id: str,
        payload_sha256: str,
        principal: str,
        on_behalf_of: str,
        worker_id: str,
    ) -> JobBegin:
        with self.lock:
            row = self.rows.get(request_id)
            if row is not None and row["sha"] == TOMBSTONE:
                if row["principal"] in (principal, on_behalf_of):
                    return JobBegin(
                        BeginKind.TERMINAL,
                        row["attempts"],
                        row["created_at"],
                        row["result"],
                        cancelled_on_arrival=True,
                    )
                # Another publisher's cancel is no claim on the id: it moves to its key.
                self.rows[scoped_key(request_id, row["principal"])] = self.rows.pop(request_id)
                row = None
            if row is None:
                self.rows[request_id] = {
                    "principal": principal,
                    "on_behalf_of": on_behalf_of,
                    "sha": payload_sha256,
                    "status": "received",
                    "attempts": 1,
                    "created_at": datetime.now(UTC),
                    "result": None,
                    "worker_id": worker_id,
                    "touched": self.clock(),
                }
                return JobBegin(BeginKind.NEW, 1, self.rows[request_id]["created_at"])
            if row["principal"] != principal:
                return JobBegin(BeginKind.FOREIGN, row["attempts"], row["created_at"])
            if row["sha"] != payload_sha256:
                return JobBegin(BeginKind.CONFLICT, row["attempts"], row["created_at"])
            if row["result"] is not None:
                return JobBegin(
                    BeginKind.TERMINAL, row["attempts"], row["created_at"], row["result"]
                )
            now = self.clock()
            if (
                self.busy_s > 0
                and row.get("worker_id") != worker_id
                and now - row.get("touched", now) < self.busy_s
            ):
                return JobBegin(BeginKind.BUSY, row["attempts"], row["created_at"])
            row.update(attempts=row["attempts"] + 1, worker_id=worker_id, touched=now)
            return JobBegin(
                BeginKind.NEW, row["attempts"], row["created_at"], template=row.get("template")
            )

    def mark(
        self, request_id: str, status: str, *, roles_snapshot: Mapping[str, Any] | None = None
    ) -> None:
        with self.lock:
            self.rows[request_id]["status"] = status

    def finish(
        self, request_id: str, status: str, *, reason: str | None, result: Mapping[str, Any]
    ) -> None:
        with self.lock:
            self.rows[request_id].update(status=status, result=dict(result))

    def terminal_result(self, request_id: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.rows.get(request_id)
            return None if row is None or row["result"] is None else dict(row["result"])

    def complete_cancelled(self, request_id: str, result: Mapping[str, Any]) -> bool:
        with self.lock:
            row = self.rows[request_id]
            if row["status"] != "cancelled":
                return False
            row["result"] = dict(result)
            return True

    def adopt_cancelled(
        self,
        request_id: str,
        *,
        payload_sha256: str,
        on_behalf_of: str,
        result: Mapping[str, Any],
    ) -> bool:
        with self.lock:
            row = self.rows[request_id]
            if row["sha"] != TOMBSTONE:
                return False
            row.update(sha=payload_sha256, on_behalf_of=on_behalf_of, result=dict(result))
            return True

    def owner(self, request_id: str) -> str | None:
        with self.lock:
            row = self.rows.get(request_id)
            return None if row is None else row.get("principal")

    def cancel(self, request_id: str, *, principal: str) -> CancelDecision:
        with self.lock:
            row = self.rows.get(request_id)
            if row is not None and principal not in (row["principal"], row["on_behalf_of"]):
                if row["sha"] != TOMBSTONE:  # another publisher's request: cancel our own
                    key = scoped_key(request_id, principal)
                    return CancelDecision(self._cancel_key(key, principal), key)
                self.rows[scoped_key(request_id, row["principal"])] = self.rows.pop(request_id)
            return CancelDecision(self._cancel_key(request_id, principal), request_id)

    def _cancel_key(self, key: str, principal: str) -> CancelOutcome:
        result = {
            "schema": "zimage.result/v1",
            "request_id": key,
            "status": "cancelled",
            "reason": "CANCELLED",
            "message": "cancelled before it started",
            "finished_at": datetime.now(UTC).isoformat(),
        }
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = {
                "principal": principal,
                "on_behalf_of": principal,
                "sha": TOMBSTONE,
                "status": "cancelled",
                "attempts": 0,
                "created_at": datetime.now(UTC),
                "result": result,
            }
            return CancelOutcome.PENDING
        if row["status"] == "cancelled":
            return CancelOutcome.CANCELLED
        if row["status"] != "received":
            return CancelOutcome.TOO_LATE
        row.update(status="cancelled", result=result)
        return CancelOutcome.CANCELLED


@dataclass
class FakeAuthorizer:
    users: dict[str, Limits] = field(default_factory=dict)
    delegators: set[str] = field(default_factory=set)
    unavailable_times: int = 0
    calls: int = 0

    def authorize(self, *, principal: str, on_behalf_of: str) -> Authorization:
        """As DirectoryAuthorizer answers (held to it by test_port_contracts): the
        publisher must exist (a user or a delegator), ids compare without case (`ALICE`
        for `alice` is no delegation; the subject is the directory's spelling), then
        delegation, then the subject must exist."""
        self.calls += 1
        if self.unavailable_times > 0:
            self.unavailable_times -= 1
            raise DependencyUnavailable("directory unreachable (fake)")
        known = {name.casefold(): name for name in [*self.users, *self.delegators]}
        if principal.casefold() not in known:
            raise RequestRejectedError(f"unknown user {principal!r}", reason="UNKNOWN_USER")
        if on_behalf_of.casefold() != principal.casefold() and principal not in self.delegators:
            raise RequestRejectedError(
                f"{principal!r} may not act on behalf of other users",
                reason="DELEGATION_NOT_ALLOWED",
            )
        subject = {name.casefold(): name for name in self.users}.get(on_behalf_of.casefold())
        if subject is None:
            raise RequestRejectedError(f"unknown user {on_behalf_of!r}", reason="UNKNOWN_USER")
        return Authorization(
            subject=subject,
            principal=principal,
            limits=self.users[subject],
            roles_snapshot={"roles": ["fake"]},
        )


class FakeQuota:
    def __init__(self, daily: int = 1000) -> None:
        self.lock = threading.Lock()
        self.daily = daily
        self.reserved: dict[str, tuple[str, int]] = {}
        self.committed: dict[str, tuple[str, int]] = {}
        self.released: set[str] = set()

    def _used(self, user: str) -> int:
        return sum(n for u, n in [*self.reserved.values(), *self.committed.values()] if u == user)

    def reserve(self, *, request_id: str, authorization: Authorization, images: int) -> None:
        with self.lock:
            if request_id in self.reserved or request_id in self.committed:
                return
            if self._used(authorization.subject) + images > self.daily:
                raise RequestRejectedError("daily quota exhausted", reason="QUOTA_EXCEEDED")
            self.reserved[request_id] = (authorization.subject, images)

    def refuses(self, authorization: Authorization, images: int) -> bool:
        with self.lock:
            return self._used(authorization.subject) + images > self.daily

    def commit(self, request_id: str, images: int) -> None:
        with self.lock:
            if request_id in self.reserved:
                user, _ = self.reserved.pop(request_id)
                self.committed[request_id] = (user, images)

    def release(self, request_id: str, reason: str) -> None:
        with self.lock:
            if self.reserved.pop(request_id, None) is not None:
                self.released.add(request_id)

    def remaining(self, authorization: Authorization) -> QuotaLeft:
        with self.lock:
            return QuotaLeft(day=self.daily - self._used(authorization.subject), month=None)


class FakeEngine:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[list[ImageSpec]] = []
        self.lock = threading.Lock()

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(name="fake/z-image", revision="0", weights_sha256="0" * 64)

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        # Refuses what the engine refuses (sizes, steps, ...), with the engine's own rules.
        for s in specs:
            validate_spec(generation_spec(s))
        with self.lock:
            self.calls.append(list(specs))
        if self.delay_s:
            time.sleep(self.delay_s)
        return [
            RawImage(
                Image.new("RGB", (s.width, s.height), (s.seed % 256, 0, 0)),
                s.seed,
                s.width,
                s.height,
                index,  # its place in the batch, as the engine adapter numbers them
            )
            for index, s in enumerate(specs)
        ]


class FakeEncoder:
    def encode(
        self,
        image: RawImage,
        *,
        request: GenerationRequest,
        model: ModelIdentity,
        created_at: datetime,
        inputs: Sequence[InputImage] = (),
    ) -> EncodedImage:
        """The request's format, as the real encoder (held to it by test_port_contracts);
        no provenance marks."""
        buffer = io.BytesIO()
        image.pixels.save(buffer, format=request.format.value.upper())
        return EncodedImage(
            buffer.getvalue(), request.format, image.width, image.height, image.seed
        )

    def mark_derived(
        self,
        derived: Any,
        *,
        source: EncodedImage,
        request: GenerationRequest,
        model: ModelIdentity,
        created_at: datetime,
        plugin: str,
    ) -> EncodedDerived:
        """The plugin's bytes as they are: the fake marks nothing."""
        return EncodedDerived(
            source_index=derived.source_index,
            name=derived.name,
            data=derived.data,
            format=derived.format,
            width=derived.width,
            height=derived.height,
            plugin=plugin,
            details=dict(derived.details),
        )


class FakeStore:
    """`failures`: that many calls fail before storing anything (transient);
    `lost_after`: every call stores that many images, then the store is lost for good
    (STORAGE_FAILED); `down`: discards fail too."""

    def __init__(self, failures: int = 0, *, lost_after: int | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.failures = failures
        self.lost_after = lost_after
        self.down = False
        self.lock = threading.Lock()

    def store(
        self,
        *,
        request: GenerationRequest,
        created_at: datetime,
        images: Sequence[EncodedImage],
        audit_record: Mapping[str, Any],
        first_attempt: bool = False,
        derived: Sequence[EncodedDerived] = (),
    ) -> StoredOutputs:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise DependencyUnavailable("object store unreachable (fake)")
            refs = []
            for index, image in enumerate(images):
                if index == self.lost_after:
                    raise StorageFailedError("object store lost mid-request (fake)")
                refs.append(self._put(f"t/{request.request_id}/{index}.png", image.data))
            extensions = {"jpeg": "jpg"}
            derived_refs = [
                self._put(
                    f"t/{request.request_id}/{d.source_index}/{d.name}."
                    f"{extensions.get(d.format, d.format)}",
                    d.data,
                )
                for d in derived
            ]
            self.objects[f"t/{request.request_id}/audit.json"] = b"{}"
            return StoredOutputs(refs, f"t/{request.request_id}/audit.json", derived_refs)

    def _put(self, key: str, data: bytes) -> StoredObjectRef:
        import hashlib

        # Like S3Store: what an earlier attempt of the request stored under its key is
        # kept (adopted), never overwritten.
        data = self.objects.setdefault(key, data)
        return StoredObjectRef("fake", key, None, hashlib.sha256(data).hexdigest(), len(data))

    def discard(self, *, request_id: str, created_at: datetime) -> list[str]:
        with self.lock:
            if self.down:
                raise StorageFailedError("object store unreachable (fake)")
            keys = [k for k in self.objects if k.startswith(f"t/{request_id}/")]
            for key in keys:
                del self.objects[key]
            return keys


class FakeObjects:
    """The Objects port in memory: buckets of keys to bytes, written once."""

    def __init__(self, default_bucket: str = "fake") -> None:
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.default_bucket = default_bucket
        self.locked_buckets: set[str] = set()
        self.down = False

    def put_json(
        self,
        key: str,
        obj: Any,
        *,
        bucket: str | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        retain_until: datetime | None = None,
        lock_mode: str | None = None,
    ) -> StoredObject:
        import hashlib

        from zimage_pipeline.storage import canonical_json

        name = bucket or self.default_bucket
        data = canonical_json(obj)
        held = self.buckets.setdefault(name, {}).setdefault(key, data)
        if held != data:
            raise ObjectConflictError(f"s3://{name}/{key} holds other content (fake)")
        return StoredObject(name, key, None, hashlib.sha256(data).hexdigest(), len(data))

    def get_object(
        self,
        key: str,
        *,
        bucket: str | None = None,
        version_id: str | None = None,
        max_bytes: int | None = None,
    ) -> bytes:
        name = bucket or self.default_bucket
        if self.down:
            raise StorageFailedError(f"get s3://{name}/{key}: unreachable (fake)")
        data = self.buckets.get(name, {}).get(key)
        if data is None or version_id not in (None, "v1"):  # one version: "v1"
            raise ObjectNotFoundError(f"s3://{name}/{key} not found (fake)")
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLargeError(f"s3://{name}/{key} is over {max_bytes} bytes (fake)")
        return data

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> Iterator[str]:
        held = self.buckets.get(bucket or self.default_bucket, {})
        return iter(sorted(k for k in held if k.startswith(prefix)))

    def list_children(
        self, prefix: str, *, bucket: str | None = None
    ) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        children: set[str] = set()
        for key in self.list_keys(prefix, bucket=bucket):
            rest = key[len(prefix) :]
            if "/" in rest:
                children.add(prefix + rest.split("/", 1)[0] + "/")
            else:
                keys.append(key)
        return keys, sorted(children)

    def object_lock_enabled(self, bucket: str) -> bool:
        return bucket in self.locked_buckets

    def check_buckets(self, buckets: Sequence[str]) -> None:
        for name in buckets:
            if name not in self.buckets:
                raise StorageFailedError(f"s3://{name}: NoSuchBucket (fake)")


class FakeAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.history: list[AuditRecord] = []
        self.lock = threading.Lock()

    def payloads(self, request_id: str, event_type: str) -> list[Mapping[str, Any]]:
        with self.lock:
            return [
                r.payload
                for r in self.history
                if (r.request_id, r.event_type) == (request_id, event_type)
            ]

    def append(
        self, *, request_id: str, event_type: str, actor: str, payload: Mapping[str, Any]
    ) -> None:
        # Held to the real chain's closed list: an event type the ledger would refuse
        # must fail here too, not only against the real ledger.
        if event_type not in EVENT_TYPES:
            raise AuditError(f"unknown audit event type {event_type!r}")
        with self.lock:
            self.events.append((request_id, event_type))
            self.history.append(AuditRecord(request_id, event_type, actor, payload))

    def append_many(self, records: Sequence[AuditRecord]) -> None:
        # All or nothing, like the chain's one transaction.
        unknown = [r.event_type for r in records if r.event_type not in EVENT_TYPES]
        if unknown:
            raise AuditError(f"unknown audit event type {unknown[0]!r}")
        for r in records:
            self.append(
                request_id=r.request_id, event_type=r.event_type, actor=r.actor, payload=r.payload
            )


class FakeLedger:
    """The Ledger port over the fake jobs, quota and audit: each step all-or-nothing
    (the quota refusal comes first, before anything is written)."""

    def __init__(self, jobs: FakeJobs, quota: FakeQuota, audit: FakeAudit) -> None:
        self.jobs, self.quota, self.audit = jobs, quota, audit
        self.discards: set[str] = set()  # queued by conclude, settled by outputs_discarded
        self.fast_admissions = 0  # first deliveries admitted by admit_new

    def admit(
        self,
        *,
        request_id: str,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        template: TemplateRef | None = None,
    ) -> None:
        self.quota.reserve(request_id=request_id, authorization=authorization, images=images)
        self.jobs.mark(request_id, "running")
        if template is not None:
            with self.jobs.lock:
                self.jobs.rows[request_id]["template"] = template
        self.audit.append_many(audit)

    def admit_new(
        self,
        *,
        job: NewJob,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        template: TemplateRef | None = None,
    ) -> bool:
        with self.jobs.lock:
            if job.request_id in self.jobs.rows:
                return False
        if self.quota.refuses(authorization, images):
            return False
        begun = self.jobs.begin(
            request_id=job.request_id,
            payload_sha256=job.payload_sha256,
            principal=job.principal,
            on_behalf_of=job.on_behalf_of,
            worker_id=job.worker_id,
        )
        assert begun.kind is BeginKind.NEW
        self.admit(
            request_id=job.request_id,
            authorization=authorization,
            images=images,
            audit=audit,
            template=template,
        )
        self.fast_admissions += 1
        return True

    def heartbeat(self, request_id: str, *, worker_id: str) -> bool:
        with self.jobs.lock:
            row = self.jobs.rows.get(request_id)
            if row is None or row["result"] is not None:
                return False
            if row.get("worker_id", worker_id) != worker_id:
                return False  # taken over by another worker: its heartbeat now
            row["beats"] = row.get("beats", 0) + 1
            row["touched"] = self.jobs.clock()
            return True

    def complete(
        self,
        *,
        request_id: str,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        result_of: Callable[[QuotaLeft], Mapping[str, Any]],
    ) -> None:
        self.quota.commit(request_id, images)
        result = result_of(self.quota.remaining(authorization))
        self.jobs.finish(request_id, "succeeded", reason=None, result=result)
        self.audit.append_many(audit)

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
        held = release and request_id in self.quota.reserved
        if release:
            self.quota.release(request_id, reason)
        self.jobs.finish(request_id, status, reason=reason, result=result)
        if discard_outputs:
            self.discards.add(request_id)
        self.audit.append_many([*audit, release_event] if held and release_event else audit)

    def outputs_discarded(self, request_id: str, *, keys: Sequence[str], actor: str) -> bool:
        if request_id not in self.discards:
            return False
        self.discards.discard(request_id)
        if keys:
            self.audit.append(
                request_id=request_id,
                event_type="outputs_discarded",
                actor=actor,
                payload={"keys": sorted(keys)},
            )
        return True

    def outputs_discard_abandoned(
        self, request_id: str, *, cause: str, message: str, actor: str
    ) -> bool:
        if request_id not in self.discards:
            return False
        self.discards.discard(request_id)
        self.audit.append(
            request_id=request_id,
            event_type="outputs_discard_abandoned",
            actor=actor,
            payload={"cause": cause, "message": message},
        )
        return True


def fake_ledger(*, daily: int = 1000) -> FakeLedger:
    return FakeLedger(FakeJobs(), FakeQuota(daily=daily), FakeAudit())
