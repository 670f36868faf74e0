"""The local stack signs: with the settings `scripts/services.sh up` writes into
.local/zimage.env, an image the worker stores carries a C2PA manifest that verifies
against the local root, as `zimage-pipeline provenance show` reports it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from tests.conftest import PROJECT_ROOT, require_env
from tests.integration.worker_harness import (
    built,
    client,
    private_settings,
    running_worker,
)
from zimage_pipeline.engine.tiny import make_tiny_model
from zimage_pipeline.ledger import migrate
from zimage_pipeline.provenance import TRAINED_ALGORITHMIC_MEDIA, read_provenance
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import Wiring

pytestmark = pytest.mark.integration

NOT_SIGNING = (
    "the local stack's settings do not sign C2PA manifests: re-run `scripts/services.sh up` "
    "and `source .local/zimage.env` (it sets ZIMAGE_PROVENANCE__C2PA_*)"
)


def local_trust_anchors() -> Path:
    anchors = os.environ.get("ZIMAGE_PROVENANCE__C2PA_TRUST_ANCHORS_FILE")
    if not anchors:
        pytest.fail(NOT_SIGNING)
    return Path(anchors)


@pytest.fixture
async def stack(tmp_path: Path, sqlite_url: str) -> AsyncIterator[tuple[Settings, Wiring]]:
    require_env("ZIMAGE_STORAGE__ACCESS_KEY_ID_FILE")
    base = private_settings()
    ledger = create_engine(sqlite_url)
    migrate.upgrade(ledger)
    ledger.dispose()
    # Nothing about provenance is set here: what signs is the local stack's environment.
    settings = load_settings(
        broker=base.broker.model_dump(),
        worker=base.worker.model_dump(),
        database={"url": sqlite_url},
        engine={"model_path": str(make_tiny_model(tmp_path / "tiny")), "device": "cpu"},
        storage={"prefix": f"c2pa-{uuid.uuid4().hex[:8]}"},
    )
    if not settings.provenance.c2pa_enabled:
        pytest.fail(NOT_SIGNING)
    async with built(settings) as wiring:
        yield settings, wiring


async def test_stored_images_carry_a_manifest_trusted_by_the_local_root(
    stack: tuple[Settings, Wiring], tmp_path: Path
) -> None:
    settings, wiring = stack
    anchors = local_trust_anchors()
    assert settings.provenance.c2pa_trust_anchors_file == anchors
    rids = {fmt: f"c2pa-{fmt}-{uuid.uuid4().hex[:8]}" for fmt in ("png", "webp", "jpeg")}
    async with running_worker(settings, wiring.ports), client(settings, "alice") as alice:
        for fmt, rid in rids.items():
            await alice.publish(
                {
                    "request_id": rid,
                    "on_behalf_of": "alice",
                    "prompt": "a lighthouse at dusk",
                    "width": 64,
                    "height": 64,
                    "steps": 2,
                    "format": fmt,
                }
            )
        results = {fmt: await alice.result_of(rid, wait_s=120) for fmt, rid in rids.items()}

    check_stored_images(settings, results, rids, anchors, tmp_path)


def check_stored_images(
    settings: Settings,
    results: dict[str, dict[str, Any]],
    rids: dict[str, str],
    anchors: Path,
    tmp_path: Path,
) -> None:
    store = ObjectStore(settings.storage)
    root_pem = anchors.read_text(encoding="ascii")
    for fmt, result in results.items():
        assert result["status"] == "succeeded", result
        (image,) = result["images"]
        data = store.get_object(image["key"])
        report = read_provenance(data, trust_anchors_pem=root_pem)
        assert report.marked_as_ai, report
        assert report.c2pa.present, (fmt, report.c2pa)
        assert report.c2pa.trusted, (fmt, report.c2pa)  # intact, and chains to the local root
        assert report.c2pa.actions == ("c2pa.created",)
        assert report.c2pa.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
        assert report.c2pa.request is not None
        assert report.c2pa.request["request_id"] == rids[fmt]
        assert report.c2pa.signer and "local C2PA signer" in report.c2pa.signer
        # Without the local root the signature is still intact, but nobody vouches for it.
        unanchored = read_provenance(data).c2pa
        assert unanchored.verified and not unanchored.trusted, unanchored

    # What an operator runs on a demo image: `provenance show FILE --trust-anchors ROOT`.
    path = tmp_path / "image.png"
    path.write_bytes(store.get_object(results["png"]["images"][0]["key"]))
    cli = [sys.executable, "-m", "zimage_pipeline.cli", "provenance", "show", str(path)]
    shown = subprocess.run(
        [*cli, "--trust-anchors", str(anchors)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "C2PA: signature trusted" in shown.stdout, shown.stdout
