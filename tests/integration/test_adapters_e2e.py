"""LoRA adapters on the real stack: a worker built from settings whose catalogue names a
LoRA file made for the tiny model; a request naming it succeeds and its result, audit
record and image provenance name the adapter and its hash; an unknown name is refused."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.test_end_to_end import e2e_settings, request, tiny_model  # noqa: F401
from tests.integration.worker_harness import built, client, running_worker
from tests.unit.engine.test_adapters import make_lora
from zimage_pipeline.provenance import read_provenance
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import Wiring

pytestmark = pytest.mark.integration


@pytest.fixture
async def stack(
    tiny_model: Path,  # noqa: F811
    ledger_url: str,
    tmp_path: Path,
) -> AsyncIterator[tuple[Settings, Wiring, str]]:
    weights = make_lora(tiny_model, tmp_path / "spring", seed=1)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    base = e2e_settings(tiny_model, ledger_url)
    settings = load_settings(
        **base.model_dump(exclude={"adapters"}),
        adapters={"spring-pastel": {"path": str(weights), "sha256": digest, "weight": 0.8}},
    )
    async with built(settings) as wiring:
        yield settings, wiring, digest


async def test_a_request_with_an_adapter_names_it_and_its_hash_everywhere(
    stack: tuple[Settings, Wiring, str],
) -> None:
    settings, wiring, digest = stack
    styled = f"lora-{uuid.uuid4().hex[:8]}"
    unknown = f"lora-{uuid.uuid4().hex[:8]}-unknown"
    async with (
        running_worker(settings, wiring.ports),
        client(settings, "cms-publisher") as cms,
    ):
        await cms.publish(request(styled, "alice", adapters=[{"name": "spring-pastel"}]))
        await cms.publish(request(unknown, "alice", adapters=[{"name": "winter"}]))
        result = await cms.result_of(styled, wait_s=120)
        refused = await cms.result_of(unknown, wait_s=60)

    assert result["status"] == "succeeded", result
    assert result["model"]["adapters"] == [
        {"name": "spring-pastel", "sha256": digest, "weight": 0.8}
    ]
    assert (refused["status"], refused["reason"]) == ("rejected", "INVALID_REQUEST")
    assert "unknown adapter 'winter'" in refused["message"]

    store = ObjectStore(settings.storage)
    record = json.loads(store.get_object(result["audit_record_key"]))
    assert record["model"]["adapters"] == [
        {"name": "spring-pastel", "sha256": digest, "weight": 0.8}
    ]
    assert record["request"]["adapters"] == [{"name": "spring-pastel", "weight": 0.8}]
    xmp = read_provenance(store.get_object(result["images"][0]["key"])).xmp
    assert f"+lora:spring-pastel@{digest[:12]}*0.8" in xmp["Iptc4xmpExt:AISystemUsed"]
