"""What a template file says (config/templates/*.toml), checked as it loads."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from zimage_pipeline.messages import (
    MAX_ADAPTERS,
    MAX_LABELS,
    MAX_PROMPT_CHARS,
    MAX_RENDITIONS,
    MAX_SIDE,
    MIN_SIDE,
    AdapterRef,
    ImageFormat,
    LabelKey,
    LabelValue,
    RenditionName,
    TemplateId,
)

# A slot in a pattern: `{name}`. Anything else in braces is literal text; there is no
# escape, no attribute access, no format spec: rendering is substitution only.
SLOT = re.compile(r"\{([a-z][a-z0-9_]*)\}")
# The slot a request's free prompt fills, when a template has it.
PROMPT_SLOT = "prompt"
SIZE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")
# Bidirectional embeddings, overrides and isolates: they can make text read differently
# from what it says, which no slot value needs.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
Tag = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slot(_Strict):
    """A typed, bounded slot. A value is always a single line: control characters and
    bidirectional overrides are refused whatever the slot allows."""

    description: str = ""
    max_length: int = Field(default=100, ge=1, le=1000)
    allowed: tuple[str, ...] = ()  # when set, the value must be one of these
    pattern: str | None = None  # when set, the value must match it whole
    default: str | None = None  # used when the request leaves the slot out

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r}: {exc}") from None
        if self.allowed and self.pattern is not None:
            raise ValueError("a slot has `allowed` or `pattern`, not both")
        # A default the slot itself refuses would blame every request that leaves the
        # slot out for the template's mistake.
        if self.default is not None and (problem := self.problem_with(self.default)):
            raise ValueError(f"default {self.default!r}: {problem}")
        return self

    def problem_with(self, value: str) -> str | None:
        """Why `value` does not fit this slot, or None when it does."""
        if any(unicodedata.category(c) == "Cc" or c in _BIDI for c in value):
            return "must not contain control characters"
        if not value.strip():
            return "must not be blank"
        if len(value) > self.max_length:
            return f"at most {self.max_length} characters"
        if self.allowed and value not in self.allowed:
            return f"one of {', '.join(self.allowed)}"
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            return f"does not match the slot's pattern {self.pattern!r}"
        return None


class Template(_Strict):
    id: TemplateId
    version: int = Field(ge=1)
    description: str = ""
    tags: tuple[Tag, ...] = ()
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    slots: dict[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")], Slot] = {}
    # "WIDTHxHEIGHT"; the first is the default. Empty: the request's size, within policy.
    sizes: tuple[str, ...] = ()
    format: ImageFormat | None = None
    steps: int | None = Field(default=None, ge=1, le=50)
    # "request": the request may set the seed (else it is derived from the request);
    # "fixed": always `fixed_seed`, and a request that sets another is refused.
    seed: str = Field(default="request", pattern=r"^(request|fixed)$")
    fixed_seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    labels: dict[LabelKey, LabelValue] = Field(default={}, max_length=MAX_LABELS)
    renditions: tuple[RenditionName, ...] = Field(default=(), max_length=MAX_RENDITIONS)
    # LoRA style adapters (catalogue names, optional weights) the template fixes: a
    # request naming other adapters is refused.
    adapters: tuple[AdapterRef, ...] = ()
    # The longest free prompt a `{prompt}` slot takes.
    prompt_max_length: int = Field(default=300, ge=1, le=MAX_PROMPT_CHARS)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        used = set(SLOT.findall(self.prompt)) | set(SLOT.findall(self.negative_prompt or ""))
        missing = used - set(self.slots) - {PROMPT_SLOT}
        if missing:
            raise ValueError(f"the pattern uses undeclared slots {sorted(missing)}")
        unused = set(self.slots) - used
        if unused:
            raise ValueError(f"slots {sorted(unused)} are declared but not used")
        if PROMPT_SLOT in self.slots:
            raise ValueError("{prompt} is the request's free prompt; it is not declared")
        for size in self.sizes:
            match = SIZE.match(size)
            sides = (int(match[1]), int(match[2])) if match else ()
            if not sides or any(s % 16 or not MIN_SIDE <= s <= MAX_SIDE for s in sides):
                raise ValueError(
                    f"size {size!r}: WIDTHxHEIGHT, each a multiple of 16 "
                    f"from {MIN_SIDE} to {MAX_SIDE}"
                )
        if len(self.adapters) > MAX_ADAPTERS:
            raise ValueError(f"at most {MAX_ADAPTERS} adapters")
        if (self.seed == "fixed") != (self.fixed_seed is not None):
            raise ValueError('seed = "fixed" and fixed_seed go together')
        return self

    @property
    def takes_prompt(self) -> bool:
        """Whether the request's free prompt fills a `{prompt}` slot."""
        text = self.prompt + (self.negative_prompt or "")
        return PROMPT_SLOT in SLOT.findall(text)

    def size_pairs(self) -> list[tuple[int, int]]:
        pairs = []
        for size in self.sizes:
            width, height = size.split("x")
            pairs.append((int(width), int(height)))
        return pairs
