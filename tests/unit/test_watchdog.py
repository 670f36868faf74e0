"""The generation watchdog: each GPU call's time limit, and what a hung call does to the
service, /healthz and the process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import PROJECT_ROOT
from tests.fakes import (
    GENEROUS,
    FakeAuthorizer,
    FakeEncoder,
    FakeEngine,
    FakeStore,
    fake_ledger,
)
from zimage_pipeline.errors import Disposition, GenerationTimeoutError
from zimage_pipeline.ports import ImageSpec, RawImage
from zimage_pipeline.service import Ports, RequestService, ServiceConfig
from zimage_pipeline.watchdog import GenerationLimits, GenerationWatchdog
from zimage_pipeline.worker.health import HealthServer

FLOOR_S = 0.3


def spec(width: int = 64, height: int = 64, steps: int = 8) -> ImageSpec:
    return ImageSpec("a cat", None, width, height, steps, 0.0, seed=1)


def watchdog(floor_s: float = FLOOR_S, per_mp_step_s: float = 0.0) -> GenerationWatchdog:
    return GenerationWatchdog(GenerationLimits(floor_s, per_mp_step_s))


@contextmanager
def gpu_thread() -> Iterator[tuple[ThreadPoolExecutor, threading.Event]]:
    """One thread, like the worker's GPU thread, and the event that frees a hung call
    (a real hang is never freed; the test's thread must end)."""
    release = threading.Event()
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        yield executor, release
    finally:
        release.set()
        executor.shutdown(wait=True)


def test_limit_is_the_floor_or_the_work_whichever_is_larger() -> None:
    limits = GenerationLimits(floor_s=300.0, per_megapixel_step_s=2.0)
    assert limits.limit_s([spec(1024, 1024, 8)]) == 300.0  # 8.4 megapixel-steps: the floor
    # 2048x2048, 50 steps, 4 images: 4.19 MP x 50 x 4 = 838.9 MP-steps x 2 s
    assert limits.limit_s([spec(2048, 2048, 50)] * 4) == pytest.approx(1677.7, abs=0.1)
    # Batch matters: twice the images, twice the allowance.
    assert limits.limit_s([spec(2048, 2048, 50)] * 8) == pytest.approx(3355.4, abs=0.1)


async def test_a_generation_within_its_limit_returns_its_result() -> None:
    with gpu_thread() as (executor, _):
        result = await watchdog().run(executor, lambda specs: len(specs), [spec(), spec()])
    assert result == 2


async def test_a_generation_past_its_limit_is_fatal_and_marks_the_process_hung() -> None:
    hangs: list[GenerationTimeoutError] = []
    dog = GenerationWatchdog(GenerationLimits(FLOOR_S, 0.0), on_hang=hangs.append)
    assert dog.problem() is None
    with gpu_thread() as (executor, release):
        started = time.monotonic()
        with pytest.raises(GenerationTimeoutError) as caught:
            await dog.run(executor, lambda _specs: release.wait(), [spec()])
        elapsed = time.monotonic() - started
    assert FLOOR_S <= elapsed < FLOOR_S + 1.0
    assert caught.value.disposition is Disposition.FATAL
    assert hangs == [caught.value] and dog.hung is caught.value
    problem = dog.problem() or ""
    assert problem.startswith("GENERATION_TIMEOUT:") and "1 image(s) of 64x64, 8 steps" in problem


async def test_time_queued_behind_another_generation_does_not_count() -> None:
    """Two calls of 0.6 x the limit each on one thread: the second finishes 1.2 limits
    after it was submitted, but only 0.6 after its thread started it."""
    dog = watchdog()
    work_s = FLOOR_S * 0.6
    with gpu_thread() as (executor, _):
        results = await asyncio.gather(
            *(dog.run(executor, lambda _specs: time.sleep(work_s) or "ok", [spec()]) for _ in "ab")
        )
    assert results == ["ok", "ok"] and dog.hung is None


async def test_calls_queued_behind_a_hung_one_fail_at_once_without_running() -> None:
    dog = watchdog()
    ran: list[str] = []

    def generate(specs: Sequence[ImageSpec]) -> str:
        ran.append(specs[0].prompt)
        release.wait()
        return "late"

    with gpu_thread() as (executor, release):
        hung = dog.run(executor, generate, [spec()])
        queued = dog.run(executor, generate, [spec()])
        outcomes = await asyncio.gather(hung, queued, return_exceptions=True)
        assert all(isinstance(o, GenerationTimeoutError) for o in outcomes), outcomes
        assert "not started" in str(outcomes[1])
        with pytest.raises(GenerationTimeoutError, match="not started"):
            await dog.run(executor, generate, [spec()])  # after the hang: refused at once
    assert ran == ["a cat"]  # only the hung call ever reached the GPU thread


async def test_cancelling_a_queued_generation_withdraws_it() -> None:
    dog = GenerationWatchdog(GenerationLimits(60.0, 0.0))
    ran: list[int] = []

    def generate(specs: Sequence[ImageSpec]) -> None:
        ran.append(len(specs))
        release.wait()

    with gpu_thread() as (executor, release):
        running = asyncio.ensure_future(dog.run(executor, generate, [spec()]))
        queued = asyncio.ensure_future(dog.run(executor, generate, [spec(), spec()]))
        await asyncio.sleep(0.1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await running
    assert ran == [1]


class HangingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        self.release.wait()
        return super().generate(specs)


async def test_a_hung_engine_fails_the_delivery_fatally_and_leaves_the_job_to_be_retried() -> None:
    """The service raises the FATAL error (the worker requeues the delivery and exits)
    instead of answering: the request is neither failed nor charged here."""
    ledger = fake_ledger()
    engine = HangingEngine()
    ports = Ports(
        jobs=ledger.jobs,
        authorizer=FakeAuthorizer(users={"alice": GENEROUS}),
        ledger=ledger,
        engine=engine,
        encoder=FakeEncoder(),
        store=FakeStore(),
        audit=ledger.audit,
    )
    with gpu_thread() as (gpu, _):
        io = ThreadPoolExecutor(max_workers=2)
        service = RequestService(
            ports,
            ServiceConfig(worker_id="w1"),
            gpu_executor=gpu,
            io_executor=io,
            watchdog=watchdog(),
        )
        body = {"request_id": "hung-1", "on_behalf_of": "alice", "prompt": "a cat"}
        try:
            with pytest.raises(GenerationTimeoutError):
                await service.handle(json.dumps(body).encode(), principal="alice")
        finally:
            engine.release.set()
            io.shutdown(wait=True)
    row = ledger.jobs.rows["hung-1"]
    assert row["result"] is None and row["attempts"] == 1  # still running: a takeover's
    assert "hung-1" not in ledger.quota.committed and "hung-1" not in ledger.quota.released


async def healthz(port: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


async def test_healthz_fails_naming_the_problem() -> None:
    problem: list[str] = []
    server = HealthServer(
        registry=CollectorRegistry(),
        is_ready=lambda: True,
        host="127.0.0.1",
        port=0,
        problem=lambda: problem[0] if problem else None,
    )
    await server.start()
    try:
        assert await healthz(server.port) == (200, "ok\n")
        problem.append("GENERATION_TIMEOUT: a generation of 1 image(s) ran past its limit")
        status, body = await healthz(server.port)
    finally:
        await server.stop()
    assert status == 503
    assert body == "unhealthy: GENERATION_TIMEOUT: a generation of 1 image(s) ran past its limit\n"


HUNG_PROCESS = """
import time
from concurrent.futures import ThreadPoolExecutor
from threading import Event
from zimage_pipeline.watchdog import arm_exit_backstop

gpu = ThreadPoolExecutor(max_workers=1)
gpu.submit(Event().wait)  # stuck for good, like a hung GPU call
time.sleep(0.2)
gpu.shutdown(wait=False, cancel_futures=True)
arm_exit_backstop(70, after_s=%s)
print("main returns", flush=True)
"""


@pytest.mark.parametrize("backstop", [False, True])
def test_a_stuck_gpu_thread_holds_the_exit_unless_the_backstop_ends_the_process(
    backstop: bool,
) -> None:
    """Why the worker exits with os._exit: the interpreter's exit joins the stuck executor
    thread and never returns; the backstop ends the process with the code it was given."""
    script = HUNG_PROCESS % ("0.5" if backstop else "3600")
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        code = process.wait(timeout=10 if backstop else 3)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        process.kill()
        output, _ = process.communicate()
    assert "main returns" in output
    assert code == (70 if backstop else None)
