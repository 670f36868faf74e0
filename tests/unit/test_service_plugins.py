"""The request path's plugin stages against the in-memory fakes: prompt filters before
any charge, failing and hanging plugins, and what the trail records."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from tests.unit.test_service import body, make
from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.messages import GenerationRequest, Status
from zimage_pipeline.plugins.api import DerivedImage, PromptRefusal, PromptSubject, SourceImage
from zimage_pipeline.plugins.prompt_filter import create as deny_list
from zimage_pipeline.plugins.registry import LoadedPlugins
from zimage_pipeline.ports import Authorization
from zimage_pipeline.service import RequestService, ServiceConfig

BANNED = {"rules": [{"id": "house-1", "words": ["foo"]}]}


class RolesAuthorizer:
    """The fake directory's answer with role names, for rules that depend on them."""

    def __init__(self, inner: Any, roles: tuple[str, ...]) -> None:
        self._inner = inner
        self._roles = roles

    def authorize(self, *, principal: str, on_behalf_of: str) -> Authorization:
        auth = self._inner.authorize(principal=principal, on_behalf_of=on_behalf_of)
        return dataclasses.replace(auth, roles=self._roles)


def with_plugins(
    plugins: LoadedPlugins, *, timeout_s: float = 5.0, roles: tuple[str, ...] = ()
) -> tuple[RequestService, Any]:
    _, ports = make()
    _record_payloads(ports.audit)
    ports.plugins = plugins
    ports.authorizer = RolesAuthorizer(ports.authorizer, roles)
    config = ServiceConfig(worker_id="w1", plugin_timeout_s=timeout_s)
    return RequestService(ports, config, gpu_executor=_pool(), io_executor=_pool()), ports


def _record_payloads(audit: Any) -> None:
    """The fake audit keeps (request_id, event); these tests read payloads too."""
    audit.records = []
    plain = audit.append

    def append(*, request_id: str, event_type: str, actor: str, payload: Any) -> None:
        audit.records.append((request_id, event_type, dict(payload)))
        plain(request_id=request_id, event_type=event_type, actor=actor, payload=payload)

    audit.append = append


def _pool() -> Any:
    from tests.unit.test_service import POOL

    return POOL


def events(ports: Any) -> list[str]:
    return [e for _, e in ports.audit.events]


def trail(ports: Any, event: str) -> dict[str, Any]:
    payloads = [p for _, e, p in ports.audit.records if e == event]
    assert len(payloads) == 1, payloads
    return dict(payloads[0])


async def test_a_refused_prompt_is_rejected_naming_the_rule_and_charges_nothing() -> None:
    service, ports = with_plugins(LoadedPlugins(prompt_filters=[("deny_list", deny_list(BANNED))]))
    # Fullwidth letters and a zero-width space: the same word after normalisation.
    outcome = await service.handle(
        body(prompt="a \uff46\uff4f\uff4f and f\u200boo"), principal="alice"
    )
    result = outcome.result
    assert result.status is Status.REJECTED
    assert result.reason == "PROMPT_REFUSED"
    assert "house-1" in (result.message or "") and "foo" not in (result.message or "")
    assert ports.ledger.quota.reserved == {} and ports.ledger.quota.committed == {}
    assert ports.engine.calls == []
    assert events(ports) == ["received", "denied"]
    denied = trail(ports, "denied")
    assert denied["rule_id"] == "house-1" and denied["plugin"] == "deny_list"


async def test_a_clean_prompt_passes_the_filter_and_is_charged_once() -> None:
    service, ports = with_plugins(LoadedPlugins(prompt_filters=[("deny_list", deny_list(BANNED))]))
    result = (await service.handle(body(prompt="a food stall"), principal="alice")).result
    assert result.status is Status.SUCCEEDED  # "food" is not the word "foo"
    assert ports.ledger.quota.committed == {"r1": ("alice", 1)}


async def test_an_exempt_role_may_use_the_word() -> None:
    rules = {"rules": [{"id": "r", "words": ["foo"], "exempt_roles": ["director"]}]}
    service, _ = with_plugins(
        LoadedPlugins(prompt_filters=[("deny_list", deny_list(rules))]), roles=("director",)
    )
    result = (await service.handle(body(prompt="foo"), principal="alice")).result
    assert result.status is Status.SUCCEEDED


class Raising:
    def check(self, request: GenerationRequest, who: PromptSubject) -> PromptRefusal | None:
        raise RuntimeError("the rules database is gone: password=hunter2")


class Hanging:
    def check(self, request: GenerationRequest, who: PromptSubject) -> PromptRefusal | None:
        time.sleep(1.0)
        return None


async def test_a_raising_filter_fails_the_request_naming_the_plugin_only() -> None:
    service, ports = with_plugins(LoadedPlugins(prompt_filters=[("house", Raising())]))
    result = (await service.handle(body(), principal="alice")).result
    assert result.status is Status.FAILED and result.reason == "PLUGIN_FAILED"
    assert result.message is not None and "house" in result.message
    assert "hunter2" not in result.message  # its own text is for operators
    assert ports.ledger.quota.reserved == {} and ports.ledger.quota.committed == {}
    failed = trail(ports, "failed")
    assert failed["plugin"] == "house" and "RuntimeError" in failed["cause"]


async def test_a_hanging_filter_is_bounded_by_the_stage_timeout() -> None:
    service, _ = with_plugins(LoadedPlugins(prompt_filters=[("slow", Hanging())]), timeout_s=0.2)
    started = time.monotonic()
    result = (await service.handle(body(), principal="alice")).result
    assert time.monotonic() - started < 0.9
    assert result.reason == "PLUGIN_FAILED" and "slow" in (result.message or "")


class Thumbnails:
    """A post-processor: one 16x16 PNG per image, or a bad one when told to."""

    def __init__(self, *, bad_name: str | None = None, raises: bool = False) -> None:
        self.bad_name = bad_name
        self.raises = raises

    def validate_request(self, request: GenerationRequest) -> None:
        if "nope" in request.renditions:
            raise InvalidRequestError("renditions: unknown preset 'nope'")

    def process(
        self, request: GenerationRequest, images: Sequence[SourceImage]
    ) -> list[DerivedImage]:
        import io

        if self.raises:
            raise OSError("disk full")
        made = []
        for image in images:
            buffer = io.BytesIO()
            image.pixels.resize((16, 16)).save(buffer, format="PNG")
            name = self.bad_name or "thumb"
            made.append(DerivedImage(image.index, name, buffer.getvalue(), "png", 16, 16))
        return made


async def test_a_postprocessor_refusing_the_request_options_charges_nothing() -> None:
    service, ports = with_plugins(LoadedPlugins(postprocessors=[("thumbs", Thumbnails())]))
    result = (await service.handle(body(renditions=["nope"]), principal="alice")).result
    assert result.status is Status.REJECTED and result.reason == "INVALID_REQUEST"
    assert "nope" in (result.message or "")
    assert ports.ledger.quota.reserved == {} and ports.engine.calls == []


async def test_a_raising_postprocessor_releases_the_reservation_and_keeps_nothing() -> None:
    service, ports = with_plugins(
        LoadedPlugins(postprocessors=[("thumbs", Thumbnails(raises=True))])
    )
    result = (await service.handle(body(), principal="alice")).result
    assert result.status is Status.FAILED and result.reason == "PLUGIN_FAILED"
    assert ports.ledger.quota.released == {"r1"} and ports.ledger.quota.committed == {}
    assert "quota_released" in events(ports)


async def test_a_postprocessor_name_that_is_no_key_segment_is_a_plugin_failure() -> None:
    plugins = LoadedPlugins(postprocessors=[("thumbs", Thumbnails(bad_name="../x"))])
    service, ports = with_plugins(plugins)
    result = (await service.handle(body(), principal="alice")).result
    assert result.reason == "PLUGIN_FAILED"
    assert not [k for k in ports.store.objects if ".." in k]
    assert "key segment" in trail(ports, "failed")["cause"]


async def test_renditions_asked_of_a_worker_without_the_plugin_are_refused_free() -> None:
    """Found by a probe: with no post-processor to make them, `renditions` and
    `focal_point` were silently dropped and the request charged as if they were made."""
    service, ports = with_plugins(LoadedPlugins())
    for rid, fields in (
        ("rn-1", {"renditions": ["thumb"]}),
        ("rn-2", {"focal_point": {"x": 0.5, "y": 0.2}}),
    ):
        result = (await service.handle(body(rid, **fields), principal="alice")).result
        assert (result.status, result.reason) == (Status.REJECTED, "INVALID_REQUEST")
        field = next(iter(fields))
        assert result.message == (
            f"{field}: this worker makes no renditions (the renditions plugin is not enabled)"
        )
    assert ports.ledger.quota.reserved == {} and ports.engine.calls == []
    plain = (await service.handle(body("rn-3"), principal="alice")).result
    assert plain.status is Status.SUCCEEDED
