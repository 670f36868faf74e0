"""Case 6: the S3 server stopped. A request that cannot store its images is retried
within the storage retry budget, then fails STORAGE_FAILED: nothing charged, its
reservation released, nothing left behind; requests succeed again once S3 is back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.private_seaweed import PrivateS3
from tests.integration.fault_matrix.stack import (
    Ledger,
    case_stack,
    matrix_settings,
    request,
    wired,
)
from tests.integration.worker_harness import client, running_worker
from zimage_pipeline.ledger.discards import DiscardQueue
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import Wiring

pytestmark = pytest.mark.integration

ATTEMPTS = 3


def settings_on(s3: PrivateS3, tiny_model: Path, ledger_url: str, **storage: Any) -> Settings:
    """The case's settings on its private S3: ATTEMPTS quick tries, a short connect timeout."""
    return matrix_settings(
        tiny_model,
        ledger_url,
        storage={
            "endpoint_url": s3.endpoint,
            "max_attempts": ATTEMPTS,
            "backoff_base_s": 0.1,
            "backoff_max_s": 0.5,
            "connect_timeout_s": 1,
            **storage,
        },
    )


async def test_storage_down_fails_the_request_uncharged_after_the_retry_budget(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    s3 = PrivateS3(tmp_path / "s3", load_settings().storage)
    s3.start()
    try:
        settings = settings_on(s3, tiny_model, postgres_url, retry_budget_s=20)
        async with (
            case_stack(settings) as (tap, ledger),
            wired(settings) as wiring,
            running_worker(settings, wiring.ports, worker_id="storer"),
            client(settings, "alice") as alice,
        ):
            await alice.publish(request("s3-before"))
            await tap.wait_for("s3-before")

            s3.stop()
            await alice.publish(request("s3-down", num_images=2))
            failed = (await tap.wait_for("s3-down"))["s3-down"]
            assert (failed["status"], failed["reason"]) == ("failed", "STORAGE_FAILED"), failed
            assert f"after {ATTEMPTS} attempts" in failed["message"], failed  # retried first
            assert ledger.reservation_state("s3-down") == "released"
            assert "quota_released" in ledger.event_types("s3-down")

            assert discards_queued(ledger) == ["s3-down"]  # its upload had begun

            s3.start()
            await alice.publish(request("s3-after"))
            await tap.wait_for("s3-after")
            await run_maintenance(wiring)
            assert discards_queued(ledger) == []
            assert "outputs_discarded" not in ledger.event_types("s3-down")  # none stored
        assert tap.first("s3-before")["status"] == "succeeded"
        assert tap.first("s3-after")["status"] == "succeeded"
        # Checked with S3 back up: the failed request left no object and no charge.
        world = assert_invariants(settings, tap, expected={"s3-before", "s3-down", "s3-after"})
        assert len(world.objects) == 4  # two succeeded requests: an image and a record each
    finally:
        s3.stop()


async def test_storage_lost_mid_request_leaves_no_orphan_object(
    tiny_model: Path, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = PrivateS3(tmp_path / "s3", load_settings().storage)
    s3.start()
    try:
        settings = settings_on(s3, tiny_model, postgres_url)
        upload = ObjectStore.put_object
        first_image_in = threading.Event()

        def upload_then_lose_s3(self: ObjectStore, key: str, data: bytes, **kw: Any) -> Any:
            # The images go up side by side: the second one waits for the first to be
            # stored, then S3 goes away under it.
            if "/s3-mid/1." in key:
                assert first_image_in.wait(30)
                s3.stop()
            stored = upload(self, key, data, **kw)
            if "/s3-mid/0." in key:
                first_image_in.set()
            return stored

        monkeypatch.setattr(ObjectStore, "put_object", upload_then_lose_s3)
        async with (
            case_stack(settings) as (tap, ledger),
            wired(settings) as wiring,
            running_worker(settings, wiring.ports, worker_id="storer"),
            client(settings, "alice") as alice,
        ):
            await alice.publish(request("s3-mid", num_images=2))
            failed = (await tap.wait_for("s3-mid"))["s3-mid"]
            assert (failed["status"], failed["reason"]) == ("failed", "STORAGE_FAILED"), failed
            # The worker could not delete image 0 (S3 is gone): the ledger keeps the job.
            assert "outputs_discarded" not in ledger.event_types("s3-mid")
            assert discards_queued(ledger) == ["s3-mid"]

            s3.start()
            await run_maintenance(wiring)  # what the worker runs every 30 s
            assert discards_queued(ledger) == []
            assert ledger.event_types("s3-mid")[-1] == "outputs_discarded"
        assert_invariants(settings, tap, expected={"s3-mid"})
    finally:
        s3.stop()


def discards_queued(ledger: Ledger) -> list[str]:
    return [p.request_id for p in DiscardQueue(ledger.engine).pending(limit=100)]


async def run_maintenance(wiring: Wiring) -> None:
    for task in wiring.maintenance:
        await asyncio.to_thread(task)
