"""Declared periodic jobs: each on its own schedule, failures contained, early wake."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from zimage_pipeline.worker import periodic
from zimage_pipeline.worker.periodic import PeriodicJob

POOL = ThreadPoolExecutor(max_workers=2)


async def test_a_failing_job_neither_stops_itself_nor_delays_another() -> None:
    runs: dict[str, int] = {"bad": 0, "good": 0}

    def bad() -> None:
        runs["bad"] += 1
        raise RuntimeError("store down")

    def good() -> None:
        runs["good"] += 1

    tasks = periodic.start([PeriodicJob("bad", 0.05, bad), PeriodicJob("good", 0.05, good)], POOL)
    await asyncio.sleep(0.3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert runs["bad"] >= 3 and runs["good"] >= 3


async def test_a_slow_job_does_not_hold_the_others() -> None:
    seen: list[float] = []
    started = time.monotonic()

    def slow() -> None:
        time.sleep(0.5)

    tasks = periodic.start(
        [
            PeriodicJob("slow", 10, slow),
            PeriodicJob("fast", 0.05, lambda: seen.append(time.monotonic() - started)),
        ],
        POOL,
    )
    await asyncio.sleep(0.3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(seen) >= 3 and seen[1] < 0.3


async def test_a_woken_job_runs_before_its_interval_and_coroutines_run_on_the_loop() -> None:
    runs: list[float] = []
    started = time.monotonic()

    async def deliver() -> None:
        runs.append(time.monotonic() - started)

    wake = asyncio.Event()
    tasks = periodic.start([PeriodicJob("sinks", 60, deliver)], POOL, wakers={"sinks": wake})
    await asyncio.sleep(0.05)
    wake.set()
    await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(runs) == 2 and runs[1] < 1.0
