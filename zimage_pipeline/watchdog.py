"""A time limit on every generation, and a process that does not outlive a hung GPU.

A GPU call that never returns (a driver hang, a kernel that never finishes, a deadlock
in a library) cannot be cancelled or killed from Python: its thread stays stuck, the
job's heartbeat keeps the request this worker's, and each redelivery of it waits behind
it. So every generation gets a limit from its size, steps and image count, with a floor
(`worker.generation_timeout_floor_s`, `worker.generation_timeout_per_megapixel_step_s`).
Past it the watchdog

- fails the request with `GenerationTimeoutError` (FATAL): the worker requeues the
  delivery unacknowledged and stops, so another worker runs it again and the ledger
  counts that start against `worker.max_job_attempts`;
- reports the reason through `problem()`, which `/healthz` serves as a failure;
- calls `on_hang`, with which the runner arms a backstop that ends the process even if
  the orderly shutdown gets stuck too.

The process must then end through `exit_process` (os._exit): the interpreter's normal
exit joins every executor thread, the stuck one included, and would wait forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from zimage_pipeline.errors import GenerationTimeoutError
from zimage_pipeline.ports import ImageSpec

if TYPE_CHECKING:
    from zimage_pipeline.settings import WorkerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
MEGAPIXEL = 1_000_000


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    floor_s: float
    per_megapixel_step_s: float

    @classmethod
    def of(cls, settings: WorkerSettings) -> GenerationLimits:
        return cls(
            floor_s=settings.generation_timeout_floor_s,
            per_megapixel_step_s=settings.generation_timeout_per_megapixel_step_s,
        )

    def limit_s(self, specs: Sequence[ImageSpec]) -> float:
        """max(floor, allowance x megapixel-steps of all the call's images). The work of
        a denoising step grows with the pixels, and a call runs steps x images of them;
        the floor covers what does not scale (prompt encoding, a compile for a new shape)."""
        megapixel_steps = sum(s.width * s.height * s.steps for s in specs) / MEGAPIXEL
        return max(self.floor_s, self.per_megapixel_step_s * megapixel_steps)


def describe(specs: Sequence[ImageSpec]) -> str:
    if not specs:
        return "no images"
    first = specs[0]  # one request's images share their size and steps
    return f"{len(specs)} image(s) of {first.width}x{first.height}, {first.steps} steps"


class GenerationWatchdog:
    """Runs each generation on the GPU executor with its time limit; after the first
    one that overruns, the process counts as hung for good (`hung`, `problem()`)."""

    def __init__(
        self,
        limits: GenerationLimits,
        *,
        on_hang: Callable[[GenerationTimeoutError], object] | None = None,
    ) -> None:
        self._limits = limits
        self._on_hang = on_hang
        self._hung: GenerationTimeoutError | None = None
        self._tripped = asyncio.Event()

    @property
    def hung(self) -> GenerationTimeoutError | None:
        return self._hung

    def problem(self) -> str | None:
        """Why this process is unhealthy (for /healthz), or None."""
        return None if self._hung is None else f"{self._hung.reason}: {self._hung}"

    async def run(
        self,
        executor: Executor,
        generate: Callable[[Sequence[ImageSpec]], T],
        specs: Sequence[ImageSpec],
    ) -> T:
        """`generate(specs)` on `executor`, bounded from the moment its thread starts it:
        time spent queued behind another generation does not count against its limit."""
        if self._hung is not None:
            raise GenerationTimeoutError(f"not started: the GPU thread is stuck ({self._hung})")
        loop = asyncio.get_running_loop()
        started: asyncio.Future[float] = loop.create_future()

        def on_gpu_thread() -> T:
            with suppress(RuntimeError):  # the loop closed while this call was queued
                loop.call_soon_threadsafe(_resolve, started, time.monotonic())
            return generate(specs)

        call = loop.run_in_executor(executor, on_gpu_thread)
        try:
            started_at = await self._wait_start(call, started)
            return await self._wait_end(call, specs, started_at)
        except asyncio.CancelledError:
            call.cancel()  # one still queued never runs; a running one cannot be stopped
            raise

    async def _wait_start(self, call: asyncio.Future[T], started: asyncio.Future[float]) -> float:
        """When the GPU thread started the call. If the generation ahead of it hangs
        meanwhile, it never will: it is withdrawn and fails like the hung one, at once."""
        tripped = asyncio.ensure_future(self._tripped.wait())
        waiting: set[asyncio.Future[Any]] = {call, started, tripped}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tripped.cancel()
        if started.done():
            return started.result()
        if call.done():  # cancelled in the queue (executor shut down): _wait_end says so
            return time.monotonic()
        call.cancel()
        raise GenerationTimeoutError(f"not started: the GPU thread is stuck ({self._hung})")

    async def _wait_end(
        self, call: asyncio.Future[T], specs: Sequence[ImageSpec], started_at: float
    ) -> T:
        limit = self._limits.limit_s(specs)
        remaining = max(0.0, started_at + limit - time.monotonic())
        done, _ = await asyncio.wait({call}, timeout=remaining)
        if call in done:
            return call.result()
        raise self._trip(specs, limit)

    def _trip(self, specs: Sequence[ImageSpec], limit: float) -> GenerationTimeoutError:
        error = GenerationTimeoutError(
            f"a generation of {describe(specs)} ran past its limit of {limit:.0f}s; "
            "the GPU thread is stuck and the process must be restarted"
        )
        if self._hung is None:
            self._hung = error
            self._tripped.set()
            log.critical("%s: %s", error.reason, error)
            if self._on_hang is not None:
                self._on_hang(error)
        return error


def _resolve(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)


def exit_process(code: int) -> NoReturn:
    """End the process now, skipping the interpreter's exit: that joins every executor
    thread, a stuck GPU thread included, and would never return."""
    logging.shutdown()  # flush the log handlers, which os._exit would not
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


def arm_exit_backstop(code: int, *, after_s: float) -> threading.Timer:
    """Exit with `code` after `after_s` unless the process ended before: the orderly
    shutdown after a hang (requeue, drain, close) may itself wait on something stuck."""
    timer = threading.Timer(after_s, _backstop_exit, args=(code, after_s))
    timer.daemon = True  # never what keeps the process alive
    timer.start()
    return timer


def _backstop_exit(code: int, after_s: float) -> None:
    log.critical("shutdown after a hung generation took over %.0fs; exiting %d now", after_s, code)
    exit_process(code)
