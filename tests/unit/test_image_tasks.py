"""Image inputs through the service: read by reference only where the policy grants the
publisher, checked (checksum, a real image, sizes), charged nothing when refused, and
handed to the engine at the request's size."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from typing import Any

from PIL import Image

from tests.fakes import GENEROUS, FakeAuthorizer, FakeObjects
from tests.unit.test_service import make
from zimage_pipeline.inputs.decode import InputLimits
from zimage_pipeline.inputs.model import parse_grant
from zimage_pipeline.messages import Status
from zimage_pipeline.ports import Authorization
from zimage_pipeline.stages.inputs import InputSource

BUCKET = "zimage-inputs"


class GrantingAuthorizer(FakeAuthorizer):
    """The fake directory, with the publisher's input grants of the policy."""

    def authorize(self, *, principal: str, on_behalf_of: str) -> Authorization:
        auth = super().authorize(principal=principal, on_behalf_of=on_behalf_of)
        return replace(auth, input_grants=(parse_grant(f"{BUCKET}/cms/"),))


def png(size: tuple[int, int], mode: str = "RGB", colour: Any = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def stored(objects: FakeObjects, key: str, data: bytes) -> dict[str, str]:
    objects.buckets.setdefault(BUCKET, {})[key] = data
    return {"bucket": BUCKET, "key": key, "sha256": hashlib.sha256(data).hexdigest()}


def setup() -> tuple[Any, Any, FakeObjects]:
    objects = FakeObjects()
    service, ports = make(
        authorizer=GrantingAuthorizer(users={"alice": GENEROUS}),
        inputs=InputSource(objects, InputLimits()),
    )
    return service, ports, objects


def body(request_id: str, **fields: Any) -> bytes:
    document = {"request_id": request_id, "on_behalf_of": "alice", "prompt": "spring kitchen"}
    return json.dumps({**document, **fields}).encode()


async def test_image_to_image_runs_at_the_init_images_size() -> None:
    service, ports, objects = setup()
    ref = stored(objects, "cms/packshot.png", png((96, 64)))
    result = (
        await service.handle(body("i1", task="image_to_image", init_image=ref), principal="alice")
    ).result
    assert result.status is Status.SUCCEEDED, result.message
    (spec,) = ports.engine.calls[0]
    assert (spec.task, spec.width, spec.height, spec.strength) == ("image_to_image", 96, 64, 0.6)
    assert spec.init_image.size == (96, 64) and spec.mask_image is None
    received = ports.audit.payloads("i1", "received")[0]
    assert received["parameters"]["init_image"]["sha256"] == ref["sha256"]


async def test_inpaint_resizes_image_and_mask_to_the_requested_size() -> None:
    service, ports, objects = setup()
    image = stored(objects, "cms/a.png", png((128, 128)))
    mask = stored(objects, "cms/a-mask.png", png((128, 128), "L", 255))
    request = body("i2", task="inpaint", init_image=image, mask_image=mask, width=64, height=64)
    result = (await service.handle(request, principal="alice")).result
    assert result.status is Status.SUCCEEDED, result.message
    (spec,) = ports.engine.calls[0]
    assert spec.init_image.size == spec.mask_image.size == (64, 64)
    assert set(spec.mask_image.getdata()) <= {0, 255}  # still binary


async def test_an_input_outside_the_grant_is_not_authorized_and_never_read() -> None:
    service, ports, objects = setup()
    ref = stored(objects, "other/packshot.png", png((64, 64)))
    read: list[str] = []
    original = objects.get_object

    def spying(key: str, **kwargs: Any) -> bytes:
        read.append(key)
        return original(key, **kwargs)

    objects.get_object = spying  # type: ignore[method-assign]
    result = (
        await service.handle(body("i3", task="image_to_image", init_image=ref), principal="alice")
    ).result
    assert (result.status, result.reason) == (Status.REJECTED, "NOT_AUTHORIZED")
    assert read == [] and not ports.engine.calls and not ports.ledger.quota.committed


async def test_every_reference_is_judged_before_any_is_read() -> None:
    """Found by a probe: an inpaint whose init image had a wrong checksum and whose mask
    was outside the grants was answered about the checksum (the init image was read
    first); the mask's refusal came only after the client fixed that."""
    service, ports, objects = setup()
    image = {**stored(objects, "cms/a.png", png((64, 64))), "sha256": "0" * 64}
    mask = stored(objects, "pim/a-mask.png", png((64, 64), "L", 255))
    read: list[str] = []
    original = objects.get_object

    def spying(key: str, **kwargs: Any) -> bytes:
        read.append(key)
        return original(key, **kwargs)

    objects.get_object = spying  # type: ignore[method-assign]
    request = body("i4", task="inpaint", init_image=image, mask_image=mask)
    result = (await service.handle(request, principal="alice")).result
    assert (result.status, result.reason) == (Status.REJECTED, "NOT_AUTHORIZED")
    assert result.message is not None and result.message.startswith("mask_image: ")
    assert read == [] and not ports.ledger.quota.committed


async def test_hostile_inputs_are_invalid_naming_the_problem_and_cost_nothing() -> None:
    service, ports, objects = setup()
    good = stored(objects, "cms/good.png", png((64, 64)))
    cases = {
        "i4": {**good, "sha256": "0" * 64},  # not the bytes the client expects
        "i5": {**good, "key": "cms/missing.png"},
        "i6": stored(objects, "cms/junk.png", b"not an image at all"),
    }
    for request_id, ref in cases.items():
        result = (
            await service.handle(
                body(request_id, task="image_to_image", init_image=ref), principal="alice"
            )
        ).result
        assert (result.status, result.reason) == (Status.REJECTED, "INVALID_REQUEST"), result
        assert result.message is not None and result.message.startswith("init_image")
    mask = stored(objects, "cms/small-mask.png", png((32, 32), "L", 255))
    result = (
        await service.handle(
            body("i7", task="inpaint", init_image=good, mask_image=mask), principal="alice"
        )
    ).result
    assert (result.status, result.reason) == (Status.REJECTED, "INVALID_REQUEST")
    assert not ports.engine.calls and not ports.ledger.quota.committed
