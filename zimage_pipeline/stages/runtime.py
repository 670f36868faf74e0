"""Where the stages' blocking calls run: the engine on a single GPU thread, everything
else (ledger, directory, object store, encoding, plugins) on a small I/O pool, so the
event loop never blocks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from zimage_pipeline.errors import PluginFailedError, RequestRejectedError
from zimage_pipeline.ports import ImageSpec, RawImage
from zimage_pipeline.stages.job import Job
from zimage_pipeline.watchdog import GenerationWatchdog

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Runtime:
    gpu_executor: Executor
    io_executor: Executor
    # Bounds each generation (None: unbounded).
    watchdog: GenerationWatchdog | None = None
    # A plugin call running longer than this ends its request PLUGIN_FAILED.
    plugin_timeout_s: float = 60.0

    async def io(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_executor, partial(fn, *args, **kwargs))

    async def gpu(self, fn: Callable[..., T], /, *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.gpu_executor, partial(fn, *args))

    async def generate(
        self, generate: Callable[[Sequence[ImageSpec]], list[RawImage]], specs: list[ImageSpec]
    ) -> list[RawImage]:
        """The engine on the GPU thread, within its time limit when there is a watchdog:
        past it, GenerationTimeoutError (FATAL) makes the worker exit and requeue."""
        if self.watchdog is None:
            return await self.gpu(generate, specs)
        return await self.watchdog.run(self.gpu_executor, generate, specs)

    async def plugin_call(self, name: str, stage: str, fn: Callable[..., T], /, *args: Any) -> T:
        """A plugin's call on the I/O pool within the stage's time limit. Its refusal of
        the request (RequestRejectedError) stands; anything else it raises, or running
        past the limit, is PLUGIN_FAILED naming it. A call past its limit cannot be
        stopped (a thread): its result is ignored."""
        try:
            return await asyncio.wait_for(self.io(fn, *args), self.plugin_timeout_s)
        except RequestRejectedError:
            raise
        except TimeoutError:
            cause = f"timed out after {self.plugin_timeout_s:g}s"
        except Exception as exc:  # a plugin's failure is the request's, never the worker's
            cause = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("plugin %s (%s) failed: %s", name, stage, cause)
        raise PluginFailedError(name, stage, cause)


async def timed(job: Job, phase: str, awaitable: Awaitable[T]) -> T:
    """`awaitable`, its seconds added to the job's timings under `phase`."""
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        job.timings[phase] = round(job.timings.get(phase, 0.0) + time.perf_counter() - started, 6)
