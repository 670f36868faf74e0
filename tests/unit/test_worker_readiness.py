"""Readiness needs progress: a consumer holding deliveries that neither start nor finish
is wedged (it holds its prefetch slots) and must say so on /readyz."""

from __future__ import annotations

import time
from typing import Any, cast

from zimage_pipeline.messages import Priority
from zimage_pipeline.observability import Metrics
from zimage_pipeline.service import RequestService
from zimage_pipeline.settings import BrokerSettings, WorkerSettings
from zimage_pipeline.worker.consumer import Worker


async def _never() -> Any:
    raise AssertionError("not connected in this test")


def make_worker(stall_after_s: float) -> Worker:
    return Worker(
        connect=_never,
        broker=BrokerSettings(),
        settings=WorkerSettings(),
        service=cast(RequestService, object()),
        metrics=Metrics(),
        stall_after_s=stall_after_s,
    )


def test_idle_is_not_a_stall_and_pending_work_without_progress_is() -> None:
    worker = make_worker(stall_after_s=60)
    now = time.monotonic()
    worker.last_progress = now - 3600
    assert not worker.stalled(now=now)  # nothing pending: idle, not wedged
    worker._scheduler.offer(object(), priority=Priority.BULK, principal="p")
    assert worker.stalled(now=now)  # an hour with work waiting and nothing moving
    worker.last_progress = now - 30
    assert not worker.stalled(now=now)


def test_ready_requires_consuming_and_progress() -> None:
    worker = make_worker(stall_after_s=60)
    assert not worker.ready  # not consuming yet
    worker._consuming = True
    assert worker.ready
    worker._scheduler.offer(object(), priority=Priority.BULK, principal="p")
    worker.last_progress = time.monotonic() - 120
    assert not worker.ready
