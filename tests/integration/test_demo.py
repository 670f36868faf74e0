"""The demo scenario (zimage_pipeline.demo) against the real services, on private names,
a fresh SQLite ledger and an in-process worker wired as `zimage-pipeline worker` is."""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from tests.conftest import PROJECT_ROOT, require_env
from tests.integration.worker_harness import (
    delete_private_topology,
    private_settings,
    running_worker,
)
from zimage_pipeline.demo import bob_quota, run_scenario
from zimage_pipeline.demo_inputs import packshot
from zimage_pipeline.demo_plugins import plugin_tables
from zimage_pipeline.demo_table import expected_outcomes, print_table
from zimage_pipeline.engine.tiny import make_tiny_model
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_types import Window, user_subject
from zimage_pipeline.provenance import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, read_provenance
from zimage_pipeline.settings import load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import build
from zimage_pipeline.worker.periodic import RESULT_SINKS_JOB

pytestmark = pytest.mark.integration


def assert_signed_by_the_local_root(store: ObjectStore, keys: list[str]) -> None:
    """The local stack signs: each image carries a C2PA manifest its root CA vouches for."""
    anchors = Path(require_env("ZIMAGE_PROVENANCE__C2PA_TRUST_ANCHORS_FILE")).read_text()
    for key in keys:
        report = read_provenance(store.get_object(key), trust_anchors_pem=anchors)
        assert report.ok and report.c2pa.trusted, (key, report.c2pa)


def demo_plugins() -> dict[str, Any]:
    """The demo's plugins (config/demo-plugins.toml), the webhook on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tables = plugin_tables(f"http://127.0.0.1:{port}/hooks/demo", root=PROJECT_ROOT)
    webhook = {k: v for k, v in tables["webhook"].items() if k != "secret_file"}
    return {**tables, "webhook": {**webhook, "secret": "demo-test-secret"}}


async def test_the_demo_scenario_ends_as_expected(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = Path(require_env("ZIMAGE_TEST_SECRETS_DIR"))
    base = private_settings()
    ledger = create_engine(sqlite_url)
    migrate.upgrade(ledger)
    ledger.dispose()
    settings = load_settings(
        broker=base.broker.model_dump(),
        worker=base.worker.model_dump(),
        database={"url": sqlite_url},
        engine={"model_path": str(make_tiny_model(tmp_path / "tiny")), "device": "cpu"},
        storage={"prefix": f"demo-{uuid.uuid4().hex[:8]}"},
        plugins=demo_plugins(),
    )
    engine = create_ledger_engine(settings.database)
    # An operator's override of bob's day: the demo must put it back afterwards.
    QuotaLedger(engine).set_limit(
        user_subject("bob"), images_per_day=7, images_per_month=None, actor="test"
    )
    wiring = build(settings)
    (sinks_job,) = [job for job in wiring.periodic if job.name == RESULT_SINKS_JOB]
    run_id = f"t{uuid.uuid4().hex[:8]}"
    try:
        async with running_worker(settings, wiring.ports):
            with bob_quota(settings, 2, run_id):
                rows = await run_scenario(
                    settings,
                    secrets_dir=secrets,
                    run_id=run_id,
                    bob_batch=4,
                    timeout_s=90,
                    run_sinks=sinks_job.run,
                )
    finally:
        for close in wiring.closers:
            close()
        await delete_private_topology(settings)

    expected = expected_outcomes(bob_allowed=2, bob_batch=4)
    assert Counter(r.key() for r in rows) == expected
    assert print_table(rows, expected) == 0
    assert "PASS" in capsys.readouterr().out
    assert [r.request_id for r in rows if r.kind == "malformed"] == [f"{run_id}-malformed"]

    # What the table calls stored is in the store; bob's override is the operator's again.
    store = ObjectStore(settings.storage)
    keys = [key for r in rows for key in r.keys]
    assert len(keys) == 1 + 2 + 1 + 1  # hero, bob's two, the preset, the new background
    assert [r.renditions for r in rows if r.kind == "hero"] == [("social", "thumb")]
    assert_signed_by_the_local_root(store, keys)
    # The background replacement says it is an edit of the packshot the demo made.
    (edited,) = [key for r in rows if r.kind == "background" for key in r.keys]
    report = read_provenance(store.get_object(edited))
    assert report.xmp["Iptc4xmpExt:DigitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert report.xmp["zimage:Input_init_image_Sha256"] == hashlib.sha256(packshot()).hexdigest()
    try:
        bob = QuotaLedger(engine).usage(user_subject("bob"))
    finally:
        engine.dispose()
    day, month = bob.window(Window.DAY), bob.window(Window.MONTH)
    assert (day.used, day.reserved, day.limit, month.limit) == (2, 0, 7, None)
