"""A job another worker is working on is BUSY for a concurrent duplicate, not taken over."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine

from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.jobs import BeginKind, JobStore

pytestmark = pytest.mark.integration


def test_busy_then_takeover_after_the_busy_window(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    try:
        migrate.upgrade(engine)
        store = JobStore(engine)
        args = {
            "request_id": "r-busy",
            "payload_sha256": "a" * 64,
            "principal": "alice",
            "on_behalf_of": "alice",
        }
        assert store.begin(**args, worker_id="w-a", busy_s=60).kind is BeginKind.NEW
        # A duplicate delivered to another worker while w-a works on it:
        assert store.begin(**args, worker_id="w-b", busy_s=60).kind is BeginKind.BUSY
        # The same worker (its own redelivery) may take it over:
        assert store.begin(**args, worker_id="w-a", busy_s=60).kind is BeginKind.NEW
        # Past the busy window the previous worker is presumed dead: takeover.
        taken = store.begin(**args, worker_id="w-b", busy_s=0)
        assert taken.kind is BeginKind.NEW and taken.job.worker_id == "w-b"
    finally:
        engine.dispose()


def test_the_owners_heartbeat_keeps_a_long_job_from_being_taken_over(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    try:
        migrate.upgrade(engine)
        store = JobStore(engine)
        args = {
            "request_id": "r-beat",
            "payload_sha256": "b" * 64,
            "principal": "alice",
            "on_behalf_of": "alice",
        }
        assert store.begin(**args, worker_id="w-a", busy_s=0.5).kind is BeginKind.NEW
        for _ in range(3):  # 0.9 s in all, longer than the busy window, beating every 0.3 s
            time.sleep(0.3)
            assert store.touch("r-beat", worker_id="w-a")
            assert store.begin(**args, worker_id="w-b", busy_s=0.5).kind is BeginKind.BUSY
        assert not store.touch("r-beat", worker_id="w-b")  # not w-b's job
        time.sleep(0.6)  # the owner stops beating (it died): taken over
        taken = store.begin(**args, worker_id="w-b", busy_s=0.5)
        assert taken.kind is BeginKind.NEW and taken.job.worker_id == "w-b"
        assert not store.touch("r-beat", worker_id="w-a")  # w-a lost it
        store.finish("r-beat", "failed", reason="X", result={"status": "failed"})
        assert not store.touch("r-beat", worker_id="w-b")  # finished jobs are not touched
    finally:
        engine.dispose()
