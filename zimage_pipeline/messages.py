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
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from zimage_pipeline.ids import (
    FORBIDDEN_RUN,
    REQUEST_ID_MAX_LENGTH,
    REQUEST_ID_PATTERN,
    no_forbidden_run,
)

REQUEST_SCHEMA: Final = "zimage.request/v1"
CANCEL_SCHEMA: Final = "zimage.cancel/v1"
RESULT_SCHEMA: Final = "zimage.result/v1"

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
LabelValue = Annotated[str, StringConstraints(max_length=256)]

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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


class GenerationRequest(_Message):
    """A client's request for images. `request_id` is its idempotency key."""

    schema_: Literal["zimage.request/v1"] = Field(default=REQUEST_SCHEMA, alias="schema")
    request_id: RequestId
    on_behalf_of: DirectoryId
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
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

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"$id": "https://zimage-pipeline.dev/schemas/zimage.request.v1.json"},
    )

    @field_validator("request_id")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..'")
        return value

    @field_validator("on_behalf_of", "prompt", "negative_prompt")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and _CONTROL_CHARS.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @property
    def pixels(self) -> int:
        return self.width * self.height


class CancelRequest(_Message):
    """Cancel a request that has not started; a started one runs to its end."""

    schema_: Literal["zimage.cancel/v1"] = Field(default=CANCEL_SCHEMA, alias="schema")
    request_id: RequestId
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


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


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    revision: str | None = None
    weights_sha256: str | None = None


class QuotaRemaining(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    day: int | None = None
    month: int | None = None


class GenerationResult(BaseModel):
    """The one terminal answer to a request, published on the results exchange."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"$id": "https://zimage-pipeline.dev/schemas/zimage.result.v1.json"},
    )

    schema_: Literal["zimage.result/v1"] = Field(default=RESULT_SCHEMA, alias="schema")
    request_id: str
    status: Status
    reason: str | None = None
    message: str | None = None
    on_behalf_of: str | None = None
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
