"""Cases 19 and 20: `kill -9` while the plugins work. Mid rendition upload: another worker
redoes the request, one outcome and one charge, and every rendition object matches the
ledger, the audit events and the audit record. Mid webhook delivery: the result is
delivered again under the same delivery id (the receiver drops the repeat), never lost."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants, read_objects
from tests.integration.fault_matrix.procs import WorkerProcess, exited_with
from tests.integration.fault_matrix.stack import (
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.test_webhook_outbox import Receiver, receiver
from tests.integration.worker_harness import client, running_worker
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.outbox import DeliveryState, SinkOutbox
from zimage_pipeline.plugins.webhook import verify_signature
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.worker.periodic import RESULT_SINKS_JOB

pytestmark = pytest.mark.integration
__all__ = ["receiver"]  # the HTTP receiver fixture of the outbox tests

LEASE_S = 3.0  # the victim's claim on its delivery; short, so the case does not wait 300 s
RENDITIONS = {
    "enabled": True,
    "default": ["thumb"],
    "allow_request": True,
    "presets": {
        "thumb": {"width": 32, "fit": "fit", "format": "webp"},
        "social": {"width": 48, "height": 24, "fit": "crop", "format": "jpeg"},
    },
}


async def test_kill_9_mid_rendition_upload_is_redone_once_and_matches_the_books(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = matrix_settings(tiny_model, postgres_url, plugins={"renditions": RENDITIONS})
    rid = "kill-mid-renditions"
    victim = WorkerProcess(
        settings, tmp_path / "victim.log", worker_id="victim", faults={"kill": "mid_renditions"}
    )
    store = ObjectStore(settings.storage)
    try:
        async with (
            case_stack(settings) as (tap, ledger),
            client(settings, "alice") as alice,
            wired(settings) as wiring,
        ):
            await victim.wait_ready()
            await alice.publish(request(rid, num_images=2, renditions=["social"]))
            await exited_with(victim, -signal.SIGKILL)
            assert "FAULT SIGKILL after uploading the rendition" in victim.log()
            # Killed mid-store: a rendition is in the store, nothing is committed or said.
            left = read_objects(store, settings.storage.prefix)
            assert any("/thumb." in k or "/social." in k for k in left), left
            assert ledger.status(rid) == "running"
            assert ledger.reservation_state(rid) == "reserved"
            assert tap.of(rid) == []

            async with running_worker(settings, wiring.ports, worker_id="rescuer"):
                result = (await tap.wait_for(rid))[rid]
        assert result["status"] == "succeeded", result
        names = [sorted(r["name"] for r in image["renditions"]) for image in result["images"]]
        assert names == [["social", "thumb"], ["social", "thumb"]]
        assert ledger.job(rid) == ("succeeded", 2)
    finally:
        victim.stop()
    # One charge, the objects exactly those the result, the `stored` event and the
    # ledger name, with their digests (the checker counts renditions in).
    world = assert_invariants(settings, tap, expected={rid})
    assert len(world.objects) == 2 + 4 + 1  # images, renditions, the audit record
    record = json.loads(store.get_object(result["audit_record_key"]))
    listed = {o["key"]: o["sha256"] for o in record["objects"] if "rendition" in o}
    published = {r["key"]: r["sha256"] for image in result["images"] for r in image["renditions"]}
    assert listed == published


async def test_kill_9_mid_webhook_delivery_delivers_again_under_the_same_id(
    tiny_model: Path, postgres_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    secret = "whsec-fault-matrix"
    webhook = {"enabled": True, "urls": [receiver.url], "secret": secret, "max_attempts": 3}
    plugins = {"webhook": webhook, "sink_lease_s": LEASE_S}
    settings = matrix_settings(tiny_model, postgres_url, plugins=plugins)
    rid = "kill-mid-webhook"
    victim = WorkerProcess(
        settings, tmp_path / "victim.log", worker_id="victim", faults={"kill": "mid_webhook"}
    )
    engine = create_ledger_engine(settings.database)
    outbox = SinkOutbox(engine)
    try:
        async with (
            case_stack(settings) as (tap, ledger),
            client(settings, "alice") as alice,
            wired(settings) as wiring,
        ):
            await victim.wait_ready()
            await alice.publish(request(rid))
            await exited_with(victim, -signal.SIGKILL)
            assert "FAULT SIGKILL after delivering" in victim.log()
            result = (await tap.wait_for(rid))[rid]
            assert result["status"] == "succeeded" and ledger.status(rid) == "succeeded"
            assert len(receiver.requests) == 1  # it arrived; the outbox never heard so
            (row,) = outbox.deliveries(rid)
            assert row.state is DeliveryState.PENDING

            # The victim's claim runs out after its lease (plugins.sink_lease_s); any
            # worker's result_sinks job then delivers the row again.
            (sinks_job,) = [j for j in wiring.periodic if j.name == RESULT_SINKS_JOB]

            async def delivered_again() -> bool:
                await asyncio.to_thread(sinks_job.run)
                return len(receiver.requests) == 2

            await wait_until(delivered_again, "the delivery again after the lease")
            (row,) = outbox.deliveries(rid)
    finally:
        victim.stop()
        engine.dispose()

    first, second = receiver.requests
    delivery_ids = {p.headers["X-Zimage-Delivery"] for p in (first, second)}
    assert len(delivery_ids) == 1  # the receiver drops the repeat by this id
    assert [p.headers["X-Zimage-Attempt"] for p in (first, second)] == ["1", "2"]
    assert json.loads(first.body) == json.loads(second.body) == result
    for post in (first, second):
        assert verify_signature(
            secret.encode(),
            timestamp=post.headers["X-Zimage-Timestamp"],
            body=post.body,
            signature=post.headers["X-Zimage-Signature"],
        )
    assert (row.state, row.attempts) == (DeliveryState.DELIVERED, 2)
    # The request itself: one outcome, one charge, one result on the wire.
    assert_invariants(settings, tap, expected={rid})
