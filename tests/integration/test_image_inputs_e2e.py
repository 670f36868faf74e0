"""Image inputs on the real stack: a packshot in S3 repainted (image_to_image) and its
background replaced (inpaint) by a worker, read only from the publisher's granted
prefix; a checksum mismatch and a reference outside the grant are refused, nothing
charged; the result's provenance names the inputs."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT
from tests.integration.test_end_to_end import e2e_settings, tiny_model  # noqa: F401 (fixture)
from tests.integration.worker_harness import built, client, running_worker
from zimage_pipeline.demo_inputs import background_mask, packshot
from zimage_pipeline.provenance import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, read_provenance
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import Wiring

pytestmark = pytest.mark.integration


@pytest.fixture
async def stack(
    tiny_model: Path,  # noqa: F811
    ledger_url: str,
    prefix: str,
) -> AsyncIterator[tuple[Settings, Wiring, str]]:
    base = e2e_settings(tiny_model, ledger_url)
    granted = f"{base.storage.bucket}/{prefix}/in/"
    settings = load_settings(
        **base.model_dump(exclude={"policy"}),
        policy={
            "file": str(PROJECT_ROOT / "config" / "policy.toml"),
            "inputs": {"cms-publisher": [granted]},
        },
    )
    async with built(settings) as wiring:
        yield settings, wiring, prefix


def put(store: ObjectStore, key: str, data: bytes) -> dict[str, Any]:
    store.client.put_object(Bucket=store.settings.bucket, Key=key, Body=data)
    return {"bucket": store.settings.bucket, "key": key, "sha256": hashlib.sha256(data).hexdigest()}


async def test_a_packshot_is_repainted_and_its_background_replaced(
    stack: tuple[Settings, Wiring, str],
) -> None:
    settings, wiring, prefix = stack
    store = ObjectStore(settings.storage)
    photo = put(store, f"{prefix}/in/packshot.png", packshot())
    mask = put(store, f"{prefix}/in/packshot-mask.png", background_mask())
    outside = put(store, f"{prefix}/elsewhere/packshot.png", packshot())
    run = uuid.uuid4().hex[:8]
    common = {"on_behalf_of": "alice", "prompt": "on a spring kitchen table", "steps": 2}
    requests = {
        f"img-{run}-edit": {"task": "image_to_image", "init_image": photo, "strength": 0.5},
        f"img-{run}-bg": {"task": "inpaint", "init_image": photo, "mask_image": mask},
        f"img-{run}-bad-sum": {
            "task": "image_to_image",
            "init_image": {**photo, "sha256": "0" * 64},
        },
        f"img-{run}-outside": {"task": "image_to_image", "init_image": outside},
    }
    async with running_worker(settings, wiring.ports), client(settings, "cms-publisher") as cms:
        for request_id, fields in requests.items():
            await cms.publish({"request_id": request_id, **common, **fields})
        results = {rid: await cms.result_of(rid, wait_s=120) for rid in requests}
        with pytest.raises(TimeoutError):  # one answer each
            await cms.next_result(wait_s=2)

    edit, background = results[f"img-{run}-edit"], results[f"img-{run}-bg"]
    assert (edit["status"], background["status"]) == ("succeeded", "succeeded"), results
    assert (edit["images"][0]["width"], edit["images"][0]["height"]) == (128, 128)
    bad, outside_result = results[f"img-{run}-bad-sum"], results[f"img-{run}-outside"]
    assert (bad["status"], bad["reason"]) == ("rejected", "INVALID_REQUEST")
    assert "init_image" in bad["message"] and "SHA-256" in bad["message"]
    assert (outside_result["status"], outside_result["reason"]) == ("rejected", "NOT_AUTHORIZED")
    assert not bad.get("images") and not outside_result.get("images")

    report = read_provenance(store.get_object(background["images"][0]["key"]))
    assert report.xmp["Iptc4xmpExt:DigitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert report.xmp["zimage:Input_init_image_Sha256"] == photo["sha256"]
    assert report.xmp["zimage:Input_mask_Sha256"] == mask["sha256"]
    assert report.c2pa.present  # the local stack signs (services.sh's local CA)
    relationships = sorted(i["relationship"] for i in report.c2pa.ingredients)
    assert relationships == ["inputTo", "parentOf"]
    assert report.c2pa.actions == ("c2pa.opened", "c2pa.edited")
