"""A hung GPU: a generation that never returns ends its worker, and the request runs
again on another worker, or ends ATTEMPTS_EXHAUSTED when every worker hangs on it.

The hanging engine blocks the GPU thread for good, as a wedged driver does; nothing in
Python can stop that thread. Past the generation's time limit the worker says so on
/healthz and exits 70 with the delivery unacknowledged, so the broker redelivers it; the
ledger counts each start against `max_job_attempts`. Only the hanging workers get a
tight limit: the rescuers keep the default."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.procs import WorkerProcess, exited_with
from tests.integration.fault_matrix.stack import case_stack, matrix_settings, request, wait_until
from tests.integration.worker_harness import client
from zimage_pipeline.settings import Settings
from zimage_pipeline.worker.consumer import EXIT_FATAL

pytestmark = pytest.mark.integration

HANG_LIMIT_S = 3.0
# From the limit to the process's end: requeue, close the broker connection, dispose the
# ledger pool. About a second; generous for a loaded CI machine.
EXIT_SLACK_S = 15.0
HANG = {"hang_on_prompt": "HANG"}
# A worker started after one hung waits for the hung job's heartbeat to lapse
# (JOB_BUSY_S), then takes it over: start-up (~10 s), the lapse, the limit, retries.
TAKEOVER_TIMEOUT_S = 120.0


def with_limit(settings: Settings, floor_s: float) -> Settings:
    """The same case (names, ledger, prefix) with another generation time limit."""
    worker = settings.worker.model_copy(
        update={
            "generation_timeout_floor_s": floor_s,
            "generation_timeout_per_megapixel_step_s": 0.0,
        }
    )
    return settings.model_copy(update={"worker": worker})


def healthz(port: int) -> int | None:
    """The status /healthz answers, or None when nothing listens (the process is gone)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            return int(sock.recv(64).split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        return None


async def health_until_exit(worker: WorkerProcess) -> list[int | None]:
    """Every change of /healthz's answer until the process exits."""
    seen: list[int | None] = []

    def poll() -> bool:
        status = healthz(worker.port)
        if not seen or seen[-1] != status:
            seen.append(status)
        return worker.process.poll() is not None

    await wait_until(poll, f"worker {worker.pid} to exit", timeout_s=60, interval_s=0.02)
    return seen


async def hang_and_exit(worker: WorkerProcess, *, generation: int = 1) -> float:
    """Wait for the worker to start hanging and for it to exit 70 because of it; return
    how long after the generation began it exited."""
    marker = "FAULT hanging"
    await wait_until(
        lambda: worker.log().count(marker) >= generation,
        "the generation to hang",
        timeout_s=TAKEOVER_TIMEOUT_S,
        interval_s=0.02,
    )
    began = time.monotonic()
    await exited_with(worker, EXIT_FATAL, timeout_s=HANG_LIMIT_S + EXIT_SLACK_S)
    assert "GENERATION_TIMEOUT" in worker.log()
    return time.monotonic() - began


async def test_a_hung_generation_ends_its_worker_and_another_worker_completes_it(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    rid = "gpu-hang"
    hanger = WorkerProcess(
        with_limit(settings, HANG_LIMIT_S), tmp_path / "hanger.log", worker_id="hanger", faults=HANG
    )
    rescuer: WorkerProcess | None = None
    try:
        async with case_stack(settings) as (tap, ledger), client(settings, "alice") as alice:
            await hanger.wait_ready()
            assert healthz(hanger.port) == 200
            await alice.publish(request(rid, prompt="HANG: the GPU never answers"))
            await wait_until(lambda: "FAULT hanging" in hanger.log(), "the generation to hang")
            began = time.monotonic()
            health = await health_until_exit(hanger)
            exited_after = time.monotonic() - began
            assert hanger.process.returncode == EXIT_FATAL, hanger.log()[-3000:]
            # Healthy while within its limit; then unhealthy (503) or gone, never healthy.
            assert health[0] == 200 and health[-1] in (503, None), health
            assert health.count(200) == 1, health
            assert HANG_LIMIT_S - 0.5 <= exited_after <= HANG_LIMIT_S + EXIT_SLACK_S
            log = hanger.log()
            assert "GENERATION_TIMEOUT" in log and "ran past its limit of 3s" in log
            # Not answered and not acked: the job is still the hung worker's start.
            assert ledger.job(rid) == ("running", 1)
            assert tap.of(rid) == []

            rescuer = WorkerProcess(settings, tmp_path / "rescuer.log", worker_id="rescuer")
            result = (await tap.wait_for(rid, timeout_s=TAKEOVER_TIMEOUT_S))[rid]
            assert rescuer.process.poll() is None
        assert result["status"] == "succeeded", result
        assert ledger.job(rid) == ("succeeded", 2)
        assert ledger.reservation_state(rid) == "committed"
        print(f"hung worker: exited {exited_after:.1f}s after the hang; /healthz saw {health}")
    finally:
        hanger.stop()
        if rescuer is not None:
            rescuer.stop()
    assert_invariants(settings, tap, expected={rid})


MAX_JOB_ATTEMPTS = 2


async def test_a_request_that_hangs_every_worker_ends_attempts_exhausted(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = with_limit(
        matrix_settings(
            tiny_model,
            postgres_url,
            worker={"max_attempts": 1, "max_job_attempts": MAX_JOB_ATTEMPTS},
        ),
        HANG_LIMIT_S,
    )
    rid = "gpu-hang-everywhere"
    workers: list[WorkerProcess] = []

    def start(n: int) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"w{n}.log", worker_id=f"w{n}", faults=HANG)
        workers.append(worker)
        return worker

    try:
        async with case_stack(settings) as (tap, ledger), client(settings, "alice") as alice:
            for n in range(1, MAX_JOB_ATTEMPTS + 1):
                worker = start(n)
                if n == 1:
                    await worker.wait_ready()
                    await alice.publish(request(rid, prompt="HANG: every GPU sticks on it"))
                exited_after = await hang_and_exit(worker)
                assert exited_after <= HANG_LIMIT_S + EXIT_SLACK_S
                assert ledger.job(rid) == ("running", n)
            # A third worker, as prone to hang: it must end the request without running it.
            last = start(MAX_JOB_ATTEMPTS + 1)
            result = (await tap.wait_for(rid, timeout_s=TAKEOVER_TIMEOUT_S))[rid]
            assert "FAULT hanging" not in last.log()
            assert healthz(last.port) == 200
            last.terminate()
            await exited_with(last, 0)
        assert (result["status"], result["reason"]) == ("failed", "ATTEMPTS_EXHAUSTED"), result
        assert f"started {MAX_JOB_ATTEMPTS + 1} times" in result["message"]
        assert ledger.job(rid) == ("failed", MAX_JOB_ATTEMPTS + 1)
        assert ledger.reservation_state(rid) == "released"
    finally:
        for worker in workers:
            worker.stop()
    assert_invariants(settings, tap, expected={rid})
