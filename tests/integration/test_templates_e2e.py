"""Templates on the real stack: two workers, each with its own catalogue holder (as each
worker process has), a template changed while they serve, the next request made from the
new version, nothing lost; marketing's free prompt refused; the template in the image's
provenance, the audit record in S3 and the trail."""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import PROJECT_ROOT
from tests.integration.test_end_to_end import e2e_settings, tiny_model  # noqa: F401 (fixture)
from tests.integration.worker_harness import built, client, running_worker
from zimage_pipeline.provenance import read_provenance
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.templates.holder import CatalogueHolder
from zimage_pipeline.wiring import Wiring

pytestmark = pytest.mark.integration

SHIPPED = PROJECT_ROOT / "config" / "templates"


@pytest.fixture
async def stack(
    tiny_model: Path,  # noqa: F811
    ledger_url: str,
    tmp_path: Path,
) -> AsyncIterator[tuple[Settings, Wiring, Path]]:
    catalogue = tmp_path / "templates"
    shutil.copytree(SHIPPED, catalogue)
    base = e2e_settings(tiny_model, ledger_url)
    settings = load_settings(
        **base.model_dump(exclude={"templates"}), templates={"dir": str(catalogue)}
    )
    async with built(settings) as wiring:
        yield settings, wiring, catalogue


class OneAtATime:
    """The shared in-process engine, one generation at a time: two worker processes
    each have their own engine, two in-process workers share this one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    @property
    def identity(self) -> Any:
        return self.inner.identity

    def generate(self, specs: Any) -> Any:
        with self.lock:
            return self.inner.generate(specs)


def hero(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "on_behalf_of": "mia",
        "template": {"id": "ecommerce-hero"},
        "variables": {"product": "Blue ceramic teapot"},
        "width": 128,
        "height": 128,
        **fields,
    }


def small_sizes(catalogue: Path, *, version: int, wording: str) -> None:
    """The hero template at `version`, sized for the tiny model, its prompt reworded."""
    path = catalogue / "ecommerce-hero.toml"
    text_ = (SHIPPED / "ecommerce-hero.toml").read_text(encoding="utf-8")
    text_ = text_.replace("version = 1", f"version = {version}")
    text_ = re.sub(r"(?m)^sizes = .*$", 'sizes = ["128x128"]', text_)
    text_ = text_.replace("Studio product photograph", wording)
    path.write_text(text_, encoding="utf-8")


async def test_a_template_changed_while_two_workers_serve_is_used_by_the_next_request(
    stack: tuple[Settings, Wiring, Path],
) -> None:
    settings, wiring, catalogue = stack
    small_sizes(catalogue, version=1, wording="Studio product photograph")
    holders = [CatalogueHolder(catalogue), CatalogueHolder(catalogue)]  # one per worker
    engine = OneAtATime(wiring.ports.engine)
    a = replace(wiring.ports, engine=engine, templates=holders[0].current)
    b = replace(wiring.ports, engine=engine, templates=holders[1].current)
    async with (
        running_worker(settings, a, worker_id="worker-a"),
        running_worker(settings, b, worker_id="worker-b"),
        client(settings, "cms-publisher") as cms,
    ):
        before = [f"tpl-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
        for request_id in before:
            await cms.publish(hero(request_id))
        # The brand team's edit lands while those are being served; each worker's poll
        # (the `reload_config` job) picks it up.
        small_sizes(catalogue, version=2, wording="Catalogue packshot")
        assert all(holder.poll() for holder in holders)
        after = f"tpl-{uuid.uuid4().hex[:8]}-after"
        pinned_gone = f"tpl-{uuid.uuid4().hex[:8]}-pinned"
        free = f"tpl-{uuid.uuid4().hex[:8]}-free"
        await cms.publish(hero(after))
        await cms.publish(hero(pinned_gone, template={"id": "ecommerce-hero", "version": 1}))
        await cms.publish({"request_id": free, "on_behalf_of": "mia", "prompt": "a cat"})
        results = {rid: await cms.result_of(rid, wait_s=120) for rid in [*before, after]}
        refused = {rid: await cms.result_of(rid, wait_s=60) for rid in (pinned_gone, free)}
        with pytest.raises(TimeoutError):  # exactly one answer each: nothing more comes
            await cms.next_result(wait_s=2)

    assert all(r["status"] == "succeeded" for r in results.values()), results
    assert (refused[pinned_gone]["status"], refused[pinned_gone]["reason"]) == (
        "rejected",
        "INVALID_REQUEST",
    )
    assert "has no version 1" in refused[pinned_gone]["message"]
    assert (refused[free]["status"], refused[free]["reason"]) == ("rejected", "NOT_AUTHORIZED")
    assert "free prompts" in refused[free]["message"]

    store = ObjectStore(settings.storage)
    versions = {}
    for rid, result in results.items():
        record = json.loads(store.get_object(result["audit_record_key"]))
        versions[rid] = record["template"]["version"]
        assert record["template"]["id"] == "ecommerce-hero"
        assert record["template"]["variables"]["product"] == "Blue ceramic teapot"
        xmp = read_provenance(store.get_object(result["images"][0]["key"])).xmp
        assert xmp["zimage:Template"] == "ecommerce-hero"
        assert xmp["zimage:TemplateVersion"] == str(record["template"]["version"])
        assert xmp["zimage:TemplateSha256"] == record["template"]["sha256"]
    assert versions[after] == 2  # the next request after the reload uses the new version
    assert set(versions.values()) <= {1, 2}

    # The trail: each request's `received` event names its template and version.
    engine = create_engine(settings.database.url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT request_id, payload FROM audit_events WHERE event_type = 'received'")
        ).all()
        jobs = conn.execute(
            text("SELECT request_id, template_id, template_version, template_sha256 FROM jobs")
        ).all()
    received = {rid: json.loads(payload) for rid, payload in rows if rid in results}
    assert received[after]["template"]["version"] == 2
    assert received[after]["template"]["id"] == "ecommerce-hero"
    # The job row records it too; a free prompt's row has none.
    job_rows = {rid: (tid, version, sha) for rid, tid, version, sha in jobs}
    assert job_rows[after] == ("ecommerce-hero", 2, received[after]["template"]["sha256"])
    assert job_rows[free] == (None, None, None)
    engine.dispose()
