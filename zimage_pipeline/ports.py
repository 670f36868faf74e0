"""The ports the request service is written against.

The core (messages, decoding, service, ports, errors) imports no I/O library; adapters
in wiring.py bind these Protocols to the ledger, ldap3, the engine and boto3. Ports are
synchronous on purpose: the service runs each call in a worker thread (a single GPU
thread for the engine, a small pool for the rest), so no adapter can block the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from zimage_pipeline.adapters import AdapterUse
from zimage_pipeline.inputs.model import InputGrant
from zimage_pipeline.messages import (
    CancelOutcome,
    GenerationRequest,
    ImageFormat,
    Priority,
    TemplateRef,
)


class BeginKind(StrEnum):
    NEW = "new"  # first attempt, or a takeover of an unfinished attempt
    TERMINAL = "terminal"  # already answered: republish the stored result
    CONFLICT = "conflict"  # same request_id, different payload
    BUSY = "busy"  # another worker is on it right now
    # The id holds another publisher's request: this publisher's is keyed apart
    # (ids.scoped_key), so nobody can squat an id by using it first.
    FOREIGN = "foreign"


@dataclass(frozen=True, slots=True)
class JobBegin:
    kind: BeginKind
    attempts: int = 1
    created_at: datetime | None = None
    result: Mapping[str, Any] | None = None
    # TERMINAL because this publisher cancelled the id before the request arrived: the
    # service adopts the row (Jobs.adopt_cancelled) and, the first time, writes the trail.
    cancelled_on_arrival: bool = False
    # NEW as a takeover of an earlier attempt that was admitted: the template version it
    # was rendered from, so the request finishes under the catalogue it was admitted with.
    template: TemplateRef | None = None


@dataclass(frozen=True, slots=True)
class CancelDecision:
    outcome: CancelOutcome
    key: str  # the ledger's key of the request cancelled (scoped for a foreign id)


class Jobs(Protocol):
    def begin(
        self,
        *,
        request_id: str,
        payload_sha256: str,
        principal: str,
        on_behalf_of: str,
        worker_id: str,
    ) -> JobBegin: ...

    def owner(self, request_id: str) -> str | None:
        """The publisher whose request holds `request_id`, None if none does."""
        ...

    def terminal_result(self, request_id: str) -> Mapping[str, Any] | None:
        """The stored result of a request that has ended, None if it has not."""
        ...

    def complete_cancelled(self, request_id: str, result: Mapping[str, Any]) -> bool:
        """Replace a cancelled request's stored result (with its subject and labels,
        which the cancel did not know); False if it is not cancelled."""
        ...

    def adopt_cancelled(
        self,
        request_id: str,
        *,
        payload_sha256: str,
        on_behalf_of: str,
        result: Mapping[str, Any],
    ) -> bool:
        """Make the row a cancel left for `request_id` this request's, with `result`;
        True for the first arrival (that writes the trail)."""
        ...

    def cancel(self, request_id: str, *, principal: str) -> CancelDecision:
        """Cancel a request of `principal`'s (as publisher or subject) not yet started."""
        ...


@dataclass(frozen=True, slots=True)
class Limits:
    """What the subject's roles allow, already combined (most generous wins)."""

    generate: bool
    delegate: bool
    max_pixels: int
    max_side: int
    max_images: int
    max_steps: int
    formats: frozenset[ImageFormat]
    priorities: frozenset[Priority]
    # Which templates the subject may use: ids, "tag:<tag>", or "*" for any.
    templates: frozenset[str] = frozenset({"*"})
    # Whether the subject may send a prompt without a template.
    free_prompt: bool = True
    # Which LoRA adapters the subject may name in a request: names, or "*" for any.
    adapters: frozenset[str] = frozenset({"*"})


@dataclass(frozen=True, slots=True)
class Authorization:
    subject: str  # the user who is served and charged (on_behalf_of)
    principal: str  # the account that published the request
    limits: Limits
    roles_snapshot: Mapping[str, Any]
    quota_subjects: Any = None  # opaque to the core: passed back to Quota.reserve
    groups: tuple[str, ...] = ()  # the subject's group DNs (nested resolved), for audit
    roles: tuple[str, ...] = ()  # the subject's role names under the policy
    # Where the publisher's input images may be read from (the policy's; none: nowhere).
    input_grants: tuple[InputGrant, ...] = ()


class Authorizer(Protocol):
    def authorize(self, *, principal: str, on_behalf_of: str) -> Authorization:
        """Directory + policy. Raises RequestRejectedError (unknown, disabled, no
        delegation right) or a RETRY error when the directory is unreachable."""
        ...


@dataclass(frozen=True, slots=True)
class NewJob:
    """What `Jobs.begin` records of a delivery, for `Ledger.admit_new`."""

    request_id: str
    payload_sha256: str
    principal: str
    on_behalf_of: str
    worker_id: str


@dataclass(frozen=True, slots=True)
class QuotaLeft:
    day: int | None
    month: int | None


@dataclass(frozen=True, slots=True)
class InputImage:
    """An input image of a request (image_to_image, inpaint), read and checked
    (stages/inputs.py): its bytes as stored, for provenance, and its pixels at the
    request's size for the engine (RGB; a mask in mode L, white = repaint)."""

    role: str  # init_image | mask
    uri: str  # s3://bucket/key
    data: bytes
    format: str  # png | jpeg | webp
    sha256: str
    pixels: Any


@dataclass(frozen=True, slots=True)
class ImageSpec:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    task: str = "text_to_image"  # engine.types.TASKS
    init_image: Any = None  # PIL images at width x height (InputImage.pixels)
    mask_image: Any = None
    strength: float = 0.6
    # LoRA adapters of the engine's catalogue: (name, weight), in the request's order.
    adapters: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class RawImage:
    """A generated image before encoding: opaque pixels (a PIL image) and its seed."""

    pixels: Any
    seed: int
    width: int
    height: int
    index: int = 0  # position within its request (0..num_images-1)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    name: str
    revision: str | None
    weights_sha256: str | None
    # The LoRA adapters a request ran with (name, file sha256, weight): part of what made
    # its images, so recorded wherever the model is (result, audit, provenance).
    adapters: tuple[AdapterUse, ...] = ()


class Engine(Protocol):
    @property
    def identity(self) -> ModelIdentity: ...

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]: ...


@dataclass(frozen=True, slots=True)
class EncodedImage:
    data: bytes
    format: ImageFormat
    width: int
    height: int
    seed: int


@dataclass(frozen=True, slots=True)
class EncodedDerived:
    """A post-processor's image (plugins.api.DerivedImage), marked with provenance that
    names its source as ingredient: ready to store under `{index}/{name}.{ext}`."""

    source_index: int
    name: str
    data: bytes
    format: str  # png | webp | jpeg | avif
    width: int
    height: int
    plugin: str  # the post-processor's name, as configured
    details: Mapping[str, Any]


class Encoder(Protocol):
    def encode(
        self,
        image: RawImage,
        *,
        request: GenerationRequest,
        model: ModelIdentity,
        created_at: datetime,
        inputs: Sequence[InputImage] = (),
    ) -> EncodedImage:
        """Encode to the requested format and embed provenance (XMP/IPTC, C2PA); an image
        edited from `inputs` names them (its C2PA ingredients)."""
        ...

    def mark_derived(
        self,
        derived: Any,  # plugins.api.DerivedImage (unmarked bytes from a post-processor)
        *,
        source: EncodedImage,
        request: GenerationRequest,
        model: ModelIdentity,
        created_at: datetime,
        plugin: str,
    ) -> EncodedDerived:
        """Embed the same provenance as `source` has (XMP/IPTC, C2PA when signing is
        configured), with `source` as the C2PA ingredient the derived image comes from."""
        ...


@dataclass(frozen=True, slots=True)
class StoredObjectRef:
    bucket: str
    key: str
    version_id: str | None
    sha256: str
    size: int
    url: str | None = None


@dataclass(frozen=True, slots=True)
class StoredOutputs:
    images: list[StoredObjectRef]
    audit_record_key: str
    # One per `derived` image given to `Store.store`, in the same order.
    derived: list[StoredObjectRef] = field(default_factory=list)


class Store(Protocol):
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
        """Upload the images, the images derived from them (each under its source's
        `{index}/{name}.{ext}`) and the audit record naming them all, checksummed, never
        overwriting other content; identical content already there counts as success.
        `first_attempt`: no earlier attempt of the request can have stored anything, so
        the record may be uploaded beside the images instead of after them."""
        ...

    def discard(self, *, request_id: str, created_at: datetime) -> list[str]:
        """Delete every object stored for the request (one attempt); the deleted keys.
        Raises a StorageError when the store cannot be reached."""
        ...


@dataclass(frozen=True, slots=True)
class StoredObject:
    bucket: str
    key: str
    version_id: str | None
    sha256: str  # hex
    size: int


class Objects(Protocol):
    """Plain object access, for what is not a request's outputs (those go through
    `Store`): the audit chain's anchors, the operator tools, `check`'s reachability line.
    `storage.ObjectStore` implements it on S3; another store is added by implementing
    this port and `Store`. Keys are checked (`storage.keys`); errors are StorageErrors."""

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
        """Store `obj` as canonical JSON under `key` once: identical content already
        there is success, other content is an ObjectConflictError (never overwritten)."""
        ...

    def get_object(
        self,
        key: str,
        *,
        bucket: str | None = None,
        version_id: str | None = None,
        max_bytes: int | None = None,
    ) -> bytes:
        """The object's bytes (that version's, when given): ObjectNotFoundError when it
        is not there, ObjectTooLargeError (unread) over `max_bytes`, StorageFailedError
        when the store cannot be reached."""
        ...

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> Iterator[str]:
        """Keys under `prefix`, in lexicographic order."""
        ...

    def list_children(
        self, prefix: str, *, bucket: str | None = None
    ) -> tuple[list[str], list[str]]:
        """One level under `prefix` (ending in '/'): its keys and its sub-prefixes."""
        ...

    def object_lock_enabled(self, bucket: str) -> bool:
        """Whether writes to `bucket` can be made immutable (S3 Object Lock)."""
        ...

    def check_buckets(self, buckets: Sequence[str]) -> None:
        """Raise a StorageError naming the first bucket that cannot be reached."""
        ...


@dataclass(frozen=True, slots=True)
class AuditRecord:
    request_id: str
    event_type: str
    actor: str
    payload: Mapping[str, Any]


class Audit(Protocol):
    def append(
        self, *, request_id: str, event_type: str, actor: str, payload: Mapping[str, Any]
    ) -> None: ...

    def append_many(self, records: Sequence[AuditRecord]) -> None:
        """Append in order, in one transaction: one commit instead of one per event."""
        ...


class Ledger(Protocol):
    """The request's ledger writes, each step one transaction (job state, quota and its
    audit events commit together or not at all). One commit per step instead of one
    per row: the control plane's cost is mostly round trips and commits
    (bench/NOTES.md), and a crash between two of them needed recovery logic."""

    def admit(
        self,
        *,
        request_id: str,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        template: TemplateRef | None = None,
    ) -> None:
        """Reserve `images` against the quotas, mark the job running with the roles
        snapshot (and the template it was rendered from), append `audit`. A quota
        refusal raises and writes nothing."""
        ...

    def admit_new(
        self,
        *,
        job: NewJob,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        template: TemplateRef | None = None,
    ) -> bool:
        """A first delivery in one transaction: create the job already running, reserve,
        append `audit`. False, writing nothing, when the request_id is taken (a
        redelivery, a duplicate) or the quota refuses: the caller then takes the step by
        step path (`Jobs.begin`, `admit`), which tells those cases apart."""
        ...

    def heartbeat(self, request_id: str, *, worker_id: str) -> bool:
        """While a job runs: it is not abandoned (no takeover) and its reservation's
        lease is extended. False if this worker no longer owns the job."""
        ...

    def complete(
        self,
        *,
        request_id: str,
        authorization: Authorization,
        images: int,
        audit: Sequence[AuditRecord],
        result_of: Callable[[QuotaLeft], Mapping[str, Any]],
    ) -> None:
        """Charge `images`, end the job `succeeded` with `result_of(quota left after the
        charge)` as its stored result, append `audit`."""
        ...

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
        """End the job unsuccessfully: give back its reservation (`release`), store the
        terminal `result`, append `audit`, then `release_event` only if the job did hold
        a reservation (the trail must not claim a release that never was);
        `discard_outputs`: its upload had begun, so queue the deletion of whatever it
        stored (see `outputs_discarded`)."""
        ...

    def outputs_discarded(self, request_id: str, *, keys: Sequence[str], actor: str) -> bool:
        """The queued discard is done: dequeue it and record the deleted `keys` (if any)
        as an `outputs_discarded` audit event, in one transaction. False (and nothing
        written) if it was not queued, or another worker recorded it first."""
        ...

    def outputs_discard_abandoned(
        self, request_id: str, *, cause: str, message: str, actor: str
    ) -> bool:
        """The queued discard can never succeed (a permanent error: the request's keys
        cannot even be built): dequeue it and record why (`cause`, a reason code, and
        `message`) as an `outputs_discard_abandoned` audit event, in one transaction.
        False (and nothing written) as for `outputs_discarded`."""
        ...


class ResultOutbox(Protocol):
    """The durable hand-off to the result sinks (plugins): a row per sink and result in
    the ledger, delivered (retried, or marked dead) by the outbox dispatcher."""

    def enqueue_result(
        self, request_key: str, event: Mapping[str, Any], publisher: str | None = None
    ) -> list[str]:
        """Queue `event` for every configured sink that takes this publisher's results,
        once per (sink, request) however often it is called; the delivery ids."""
        ...
