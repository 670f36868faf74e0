"""Declared periodic jobs: the worker's housekeeping, each on its own schedule.

A job is a name, an interval and a callable: blocking callables run on the I/O pool,
coroutine functions on the loop. Each job runs in its own task, so a slow one (an anchor
upload) never delays another (the result sinks' deliveries), and a failing one is logged
by name and tried again at its next turn; none can stop the worker. A job may also be
woken early (`wake`): the result sinks run as soon as a result is queued for them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# The job that delivers the result sinks' outbox: the worker wakes it as soon as a
# result was queued for them, instead of at its next turn.
RESULT_SINKS_JOB = "result_sinks"


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    name: str
    every_s: float
    run: Callable[[], Any]
    # Housekeeping of the ledger and the store (leases, discards, anchors), which a test
    # may run by hand (Wiring.maintenance), as opposed to the worker's own jobs.
    housekeeping: bool = True


async def run_once(job: PeriodicJob, io: Executor) -> None:
    if inspect.iscoroutinefunction(job.run):
        await job.run()
    else:
        await asyncio.get_running_loop().run_in_executor(io, job.run)


async def run_forever(job: PeriodicJob, io: Executor, wake: asyncio.Event | None = None) -> None:
    """Run `job` now and then every `every_s` (or as soon as `wake` is set), forever."""
    while True:
        if wake is not None:
            wake.clear()  # before the run: a wake during it makes the next run start at once
        try:
            await run_once(job, io)
        except Exception:
            log.exception("periodic job %s failed; next run in %gs", job.name, job.every_s)
        if wake is None:
            await asyncio.sleep(job.every_s)
            continue
        with suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), job.every_s)


def start(
    jobs: list[PeriodicJob], io: Executor, wakers: dict[str, asyncio.Event] | None = None
) -> list[asyncio.Task[None]]:
    wakers = wakers or {}
    return [
        asyncio.create_task(run_forever(job, io, wakers.get(job.name)), name=f"periodic:{job.name}")
        for job in jobs
    ]
