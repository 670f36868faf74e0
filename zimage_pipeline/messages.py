"""The message contract: `zimage.request/v1`, `zimage.cancel/v1` and `zimage.result/v1`.

Pure pydantic, no I/O. The JSON Schemas in docs/schemas/ are generated from these models
(`python -m zimage_pipeline.schemas`) and a test keeps them in sync.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from zimage_pipeline import s3names
from zimage_pipeline.ids import (
    FORBIDDEN_RUN,
    REQUEST_ID_MAX_LENGTH,
    REQUEST_ID_PATTERN,
    no_forbidden_run,
)
from zimage_pipeline.invisible import is_ignorable
from zimage_pipeline.reasons import Reason, is_client_reason

REQUEST_SCHEMA: Final = "zimage.request/v1"
CANCEL_SCHEMA: Final = "zimage.cancel/v1"
RESULT_SCHEMA: Final = "zimage.result/v1"
CANCEL_RESULT_SCHEMA: Final = "zimage.cancel-result/v1"

# Z-Image-Turbo's model card: 8 denoising forwards, no classifier-free guidance.
DEFAULT_STEPS = 8
DEFAULT_SIZE = 1024
MAX_SIDE = 2048
MIN_SIDE = 64
MAX_PROMPT_CHARS = 4000
MAX_LABELS = 16

# The one request-id alphabet (ids.py), for requests and cancels alike. The `..` rule is
# in the JSON Schema too (`not`), so a schema-valid id is one the worker accepts.
RequestId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=REQUEST_ID_MAX_LENGTH, pattern=REQUEST_ID_PATTERN),
    AfterValidator(no_forbidden_run),
    Field(json_schema_extra={"not": {"pattern": re.escape(FORBIDDEN_RUN)}}),
]
# Directory ids are escaped before they reach a filter; here only bounded and printable.
DirectoryId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LabelKey = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")
]
# A label is one line of printable text: no C0 or C1 control character (a NUL would
# not even fit PostgreSQL's text columns, where labels are indexed for the audit).
LABEL_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _one_printable_line(value: str) -> str:
    if LABEL_CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    return value


LabelValue = Annotated[
    str,
    StringConstraints(max_length=256),
    AfterValidator(_one_printable_line),
    Field(json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f-\x9f]*$"}),
]

# In a prompt: C0 and C1 controls, except tab, line feed and carriage return.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _invisible(char: str) -> bool:
    """Whitespace, or a character that renders as nothing (zero-width space, joiners,
    the byte order mark, bidi marks, variation selectors, fillers): a prompt of only
    these says nothing."""
    return char.isspace() or is_ignorable(char)


class Priority(StrEnum):
    INTERACTIVE = "interactive"  # CMS publishing: a person is waiting
    STANDARD = "standard"
    BULK = "bulk"  # team batches, backfills


class ImageFormat(StrEnum):
    PNG = "png"
    WEBP = "webp"
    JPEG = "jpeg"


class Status(StrEnum):
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class _Message(BaseModel):
    # strict: "1024" is not an int and 1 is not a string; unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


MAX_RENDITIONS = 16
# A template's id in the catalogue (config/templates/): also a key of the audit index.
TemplateId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
]
SlotName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
]
# Each slot bounds its own values further (templates/model.py); this is the outer bound.
SlotValue = Annotated[str, StringConstraints(max_length=1000)]
MAX_VARIABLES = 32


class TemplateRef(BaseModel):
    """A template of the catalogue: the newest version, or one pinned by `version`; a
    client may also pin the catalogue file's content by `sha256`. The worker fills in
    both for the request it runs, so the trail says exactly what was used."""

    id: TemplateId
    version: int | None = Field(default=None, ge=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


AdapterName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
]
MAX_ADAPTERS = 4  # adapters.MAX_ADAPTERS_PER_REQUEST; a worker may run fewer at once


class AdapterRef(BaseModel):
    """A LoRA style adapter of the worker's catalogue, by name only (never a path), and
    its weight (the catalogue's default when absent). The worker fills in the weight
    for the request it runs."""

    name: AdapterName
    weight: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


DEFAULT_STRENGTH = 0.6  # image_to_image and inpaint, when the request sets none


class Task(StrEnum):
    """What the request asks the model for (one set of weights serves all three)."""

    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_TO_IMAGE = "image_to_image"  # `init_image` repainted by `strength`
    INPAINT = "inpaint"  # `init_image` repainted where `mask_image` is white


class ImageRef(BaseModel):
    """An input image in S3-compatible storage, read by the worker with its own
    credentials from the buckets and prefixes the policy grants the publisher. The
    client states the SHA-256 it expects; another content is INVALID_REQUEST."""

    # The rules are s3names' (validators below, whose errors name the problem); the
    # schema carries them as patterns, so a schema-valid reference is one the worker takes.
    bucket: str = Field(
        min_length=3,
        max_length=63,
        json_schema_extra={
            "pattern": s3names.BUCKET_SCHEMA_PATTERN,
            "not": {"pattern": s3names.BUCKET_SCHEMA_NOT},
        },
    )
    key: str = Field(
        min_length=1,
        max_length=1024,
        json_schema_extra={
            "pattern": s3names.KEY_SCHEMA_PATTERN,
            "not": {"pattern": s3names.KEY_SCHEMA_NOT},
        },
    )
    # Opaque to us, printable ASCII in every S3 implementation (a query parameter).
    version_id: str | None = Field(
        default=None, min_length=1, max_length=1024, pattern=r"^[\x21-\x7e]+$"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("bucket")
    @classmethod
    def _s3_bucket(cls, value: str) -> str:
        problem = s3names.bucket_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("key")
    @classmethod
    def _plain_key(cls, value: str) -> str:
        problem = s3names.key_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


RenditionName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
]


class FocalPoint(_Message):
    """A point of the image as fractions of its width (x) and height (y), from top left."""

    x: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    y: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


class GenerationRequest(_Message):
    """A client's request for images. `request_id` is its idempotency key."""

    schema_: Literal["zimage.request/v1"] = Field(default=REQUEST_SCHEMA, alias="schema")
    request_id: RequestId
    on_behalf_of: DirectoryId
    # Required unless a template is named: then it fills the template's {prompt} slot,
    # if the template has one (templates/render.py).
    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] = ""
    negative_prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = None
    width: int = Field(default=DEFAULT_SIZE, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    height: int = Field(default=DEFAULT_SIZE, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    steps: int = Field(default=DEFAULT_STEPS, ge=1, le=50)
    guidance_scale: float = Field(default=0.0, ge=0.0, le=20.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    num_images: int = Field(default=1, ge=1, le=8)
    format: ImageFormat = ImageFormat.PNG
    quality: int = Field(default=90, ge=1, le=100)
    priority: Priority = Priority.STANDARD
    expires_at: AwareDatetime | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    # Added in v1 without a new schema: optional, and absent means what it meant before
    # (docs/architecture.md, "How the contract evolves"). Names of rendition presets the
    # renditions plugin is configured with, on top of the ones it makes for everyone.
    renditions: list[RenditionName] = Field(default_factory=list, max_length=MAX_RENDITIONS)
    # Where crops keep their centre, as fractions of width and height (default: middle).
    focal_point: FocalPoint | None = None
    # Added in v1 like `renditions`: a preset of the catalogue and its slots' values. The
    # template's own defaults (size, format, steps, labels, ...) apply to what the
    # request leaves unset; what it sets must be allowed by the template.
    template: TemplateRef | None = None
    variables: dict[SlotName, SlotValue] = Field(default_factory=dict, max_length=MAX_VARIABLES)
    # Added in v1 the same way: image inputs. Absent: text_to_image, as before.
    task: Task = Task.TEXT_TO_IMAGE
    init_image: ImageRef | None = None
    mask_image: ImageRef | None = None
    # Unset (null): DEFAULT_STRENGTH for the image tasks. Not a 0.6 default in the model,
    # so that a client serializing this model with its defaults sends no strength with
    # text_to_image, which takes none (see `repaint_strength`).
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    # Added in v1 the same way: LoRA style adapters of the catalogue. Absent: none.
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=MAX_ADAPTERS)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"$id": "https://zimage-pipeline.dev/schemas/zimage.request.v1.json"},
    )

    @property
    def repaint_strength(self) -> float:
        """How much of the init image is repainted (image tasks): the request's, or 0.6."""
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    @model_validator(mode="after")
    def _inputs_of_the_task(self) -> GenerationRequest:
        task = self.task.value
        wants_image = self.task is not Task.TEXT_TO_IMAGE
        if wants_image and self.init_image is None:
            raise ValueError(f"init_image: {task} needs an init image")
        if not wants_image and self.init_image is not None:
            raise ValueError(f"init_image: {task} takes no init image")
        if self.task is Task.INPAINT and self.mask_image is None:
            raise ValueError(f"mask_image: {task} needs a mask")
        if self.task is not Task.INPAINT and self.mask_image is not None:
            raise ValueError(f"mask_image: {task} takes no mask (only inpaint does)")
        # A strength the model would ignore is a client's mistake, not a no-op to hide.
        if not wants_image and self.strength is not None:
            raise ValueError(f"strength: {task} takes no strength (image_to_image and inpaint do)")
        return self

    @model_validator(mode="after")
    def _prompt_or_template(self) -> GenerationRequest:
        if self.template is None:
            if not self.prompt:
                raise ValueError("prompt: required (or name a template)")
            if self.variables:
                raise ValueError("variables: only with a template")
        return self

    @field_validator("request_id")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..'")
        return value

    @field_validator("on_behalf_of", "prompt", "negative_prompt")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and CONTROL_CHARS.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if value and all(_invisible(char) for char in value):
            raise ValueError("must not be blank (only spaces or invisible characters)")
        return value

    @property
    def pixels(self) -> int:
        return self.width * self.height


class CancelRequest(_Message):
    """Cancel a request that has not started; a started one runs to its end."""

    schema_: Literal["zimage.cancel/v1"] = Field(default=CANCEL_SCHEMA, alias="schema")
    request_id: RequestId
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class StoredRendition(BaseModel):
    """An image a post-processor derived from a generated one, stored beside it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    bucket: str
    key: str
    version_id: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    bytes: int = Field(ge=0)
    width: int
    height: int
    format: str  # png | webp | jpeg | avif
    plugin: str  # the post-processor that made it
    url: str | None = None


class StoredImage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    key: str
    version_id: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    bytes: int = Field(ge=0)
    width: int
    height: int
    format: ImageFormat
    seed: int
    url: str | None = None
    renditions: list[StoredRendition] = Field(default_factory=list)


class AdapterInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    sha256: str
    weight: float


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    revision: str | None = None
    weights_sha256: str | None = None
    # Added in v1: the LoRA adapters the images were made with (absent: none).
    adapters: list[AdapterInfo] = Field(default_factory=list)


class QuotaRemaining(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    day: int | None = None
    month: int | None = None


def _closed_reason(value: object) -> object:
    # A stored result of an older release may carry a code that is no longer a client's
    # (an internal one): republished, it says INTERNAL_ERROR instead of failing to load.
    if isinstance(value, str) and not is_client_reason(value):
        return Reason.INTERNAL_ERROR
    return value


class GenerationResult(BaseModel):
    """The one terminal answer to a request, published on the results exchange."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"$id": "https://zimage-pipeline.dev/schemas/zimage.result.v1.json"},
    )

    schema_: Literal["zimage.result/v1"] = Field(default=RESULT_SCHEMA, alias="schema")
    # The request this result is the outcome of; "" when the message answered is not a
    # request of the ledger (unreadable, invalid, or without a publisher): such a
    # result never speaks for an id, which may be someone else's.
    request_id: str
    status: Status
    reason: Annotated[Reason | None, BeforeValidator(_closed_reason)] = None
    message: str | None = None
    on_behalf_of: str | None = None
    # The id the answered message claimed, when it was readable but not answered under
    # it (request_id ""), so the publisher knows which of its messages failed.
    claimed_request_id: str | None = None
    # Echo of the answered message's AMQP correlation_id, else its message_id.
    correlation_id: str | None = None
    images: list[StoredImage] = Field(default_factory=list)
    audit_record_key: str | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    model: ModelInfo | None = None
    quota_remaining: QuotaRemaining | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    finished_at: datetime

    @field_validator("timings_s")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in value.items() if math.isfinite(v)}

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # it had not started: it ends cancelled, nothing charged
    PENDING = "pending"  # no request of yours has this id yet: when it arrives, it is cancelled
    TOO_LATE = "too_late"  # it started or ended already: it runs to its end
    UNKNOWN = "unknown"  # the id is not a request of yours (nothing is remembered)
    INVALID = "invalid"  # not a valid cancel message; the message says why


class CancelResult(BaseModel):
    """The answer to a cancel, published on the results exchange under routing key
    `cancel.<publisher>.<outcome>` (a consumer of `result.<publisher>.#` never sees it)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_extra={
            "$id": "https://zimage-pipeline.dev/schemas/zimage.cancel-result.v1.json"
        },
    )

    schema_: Literal["zimage.cancel-result/v1"] = Field(
        default=CANCEL_RESULT_SCHEMA, alias="schema"
    )
    request_id: str  # "" when the cancel's id could not be read
    outcome: CancelOutcome
    message: str
    correlation_id: str | None = None
    finished_at: datetime

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")
