"""What a plugin sees: the extension points of the request path and their data.

A plugin is a Python entry point in one of the groups below whose object is a factory:
called once at startup with the plugin's own table from `[plugins.<name>]` (never the
rest of the configuration, so it sees no secret it was not given), it returns the plugin.
An installed plugin that is not enabled in the configuration is never loaded.

Every method is synchronous and runs off the event loop on the worker's I/O pool, within
the stage's time limit (`[plugins] stage_timeout_s`). A plugin that raises ends the
request `failed` with reason PLUGIN_FAILED and a message naming the plugin; nothing is
charged and nothing it left behind is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, get_args

from zimage_pipeline.messages import GenerationRequest


class Group(StrEnum):
    """The entry-point groups, one per extension point, in the order a request meets them."""

    PROMPT_FILTERS = "zimage_pipeline.prompt_filters"  # after admission checks, before quota
    POSTPROCESSORS = "zimage_pipeline.postprocessors"  # after encoding, before storing
    RESULT_SINKS = "zimage_pipeline.result_sinks"  # after the result is published


PluginConfig = Mapping[str, Any]
PluginFactory = Callable[[PluginConfig], Any]


@dataclass(frozen=True, slots=True)
class PromptSubject:
    """Who asks for a prompt, for filters configured per role."""

    subject: str  # the user served (on_behalf_of)
    principal: str  # the publishing account
    roles: tuple[str, ...]  # the subject's role names under the policy


@dataclass(frozen=True, slots=True)
class PromptRefusal:
    """A filter's refusal: the rule that matched (its id, never the rule list)."""

    rule_id: str
    message: str = "the prompt contains text that is not allowed"


class PromptFilter(Protocol):
    def check(self, request: GenerationRequest, who: PromptSubject) -> PromptRefusal | None:
        """None to let the request through; a refusal ends it `rejected`
        PROMPT_REFUSED, nothing charged, with an audit event naming the rule."""
        ...


@dataclass(frozen=True, slots=True)
class SourceImage:
    """One generated image, encoded and marked, as the post-processors see it."""

    index: int
    pixels: Any  # a PIL image (RGB), read-only by convention
    data: bytes  # the encoded original, with its provenance
    format: str  # png | webp | jpeg
    width: int
    height: int
    seed: int
    sha256: str


# What a post-processor's DerivedImage may be: one of these formats, and a name that is
# one segment of its object key (stored as `{index}/{name}.{ext}`).
DerivedFormat = Literal["png", "webp", "jpeg", "avif"]
DERIVED_FORMATS: frozenset[str] = frozenset(get_args(DerivedFormat))
DERIVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class DerivedImage:
    """An image a post-processor made from a source: stored beside the original under
    `{index}/{name}.{ext}`, listed in the result and the audit record.

    `name` is a key segment ([A-Za-z0-9._-], at most 64); `format` one of png, webp,
    jpeg, avif; `data` already carries the provenance the plugin gave it."""

    source_index: int
    name: str
    data: bytes
    format: str
    width: int
    height: int
    details: Mapping[str, Any] = field(default_factory=dict)  # e.g. crop box, focal point


class PostProcessor(Protocol):
    def process(
        self, request: GenerationRequest, images: Sequence[SourceImage]
    ) -> list[DerivedImage]: ...


@dataclass(frozen=True, slots=True)
class SinkDelivery:
    """One result for one sink. `delivery_id` is the same on every attempt, so a
    receiver can drop repeats; `attempt` counts from 1."""

    delivery_id: str
    request_id: str
    attempt: int
    event: Mapping[str, Any]  # the result event, exactly as published on AMQP
    # The AMQP account that published the request (the tenant): a sink serving several
    # tenants routes by it. None for deliveries queued before it was recorded.
    publisher: str | None = None


class ResultSink(Protocol):
    """A sink may also define `wants(publisher: str | None) -> bool`: when it answers
    False for a result's publisher, nothing is queued for it (the webhook routes each
    tenant's results to that tenant's URLs only, and has none for some)."""

    def deliver(self, delivery: SinkDelivery) -> None:
        """Deliver or raise; the outbox retries with backoff and marks the delivery
        dead after the sink's `max_attempts`."""
        ...
