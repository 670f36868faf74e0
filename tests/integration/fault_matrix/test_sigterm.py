"""Case 7: SIGTERM to a real worker process in the middle of a batch. What is in flight
finishes within the grace period or goes back to the queue; nothing is lost, nothing is
done twice, and the process exits 0 without outliving the grace period by more than the
generation it cannot interrupt."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.procs import WorkerProcess, exited_with
from tests.integration.fault_matrix.stack import (
    CountingEngine,
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.worker_harness import client, running_worker

pytestmark = pytest.mark.integration

GRACE_S = 4.0
GENERATE_S = 2.5  # the first generation ends inside the grace, the second after it
BATCH = 5


async def test_sigterm_during_a_batch_finishes_or_requeues_within_the_grace(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = matrix_settings(
        tiny_model, postgres_url, worker={"concurrency": 2, "shutdown_grace_s": GRACE_S}
    )
    ids = [f"term-{i}" for i in range(BATCH)]
    victim = WorkerProcess(
        settings,
        tmp_path / "victim.log",
        worker_id="victim",
        faults={"generate_delay_s": GENERATE_S},
    )
    try:
        async with (
            case_stack(settings) as (tap, ledger),
            client(settings, "alice") as alice,
            wired(settings) as wiring,
        ):
            await victim.wait_ready()
            for rid in ids:
                await alice.publish(request(rid))
            # Two in flight (concurrency 2): one generating, one waiting for the GPU thread.
            await wait_until(
                lambda: (
                    "FAULT generating" in victim.log()
                    and sum(ledger.status(r) == "running" for r in ids) == 2
                ),
                "two requests in flight on the victim",
            )
            victim.terminate()
            signalled = time.monotonic()
            await exited_with(victim, 0, timeout_s=GRACE_S + GENERATE_S + 30)
            took_s = time.monotonic() - signalled
            log = victim.log()
            # The generation that outlives the grace cannot be interrupted (it is on the
            # GPU thread); the process waits for it, then leaves. Nothing longer.
            assert took_s < GRACE_S + GENERATE_S + 5, (took_s, log[-2000:])
            assert "draining 2 in-flight request(s)" in log, log[-2000:]
            finished_by_victim = {r for r in ids if tap.of(r)}
            assert len(finished_by_victim) == 1, finished_by_victim  # in time
            assert "grace period over: requeueing an unfinished request" in log  # not in time

            counting = CountingEngine(wiring.ports.engine)
            ports = replace(wiring.ports, engine=counting)
            async with running_worker(settings, ports, worker_id="rescuer"):
                await tap.wait_for(*ids)
        assert {tap.first(r)["status"] for r in ids} == {"succeeded"}
        # Everything the victim did not finish is done exactly once by the rescuer.
        assert counting.images == BATCH - len(finished_by_victim)
    finally:
        victim.stop()
    world = assert_invariants(settings, tap, expected=set(ids))
    assert len(world.results) == BATCH  # nothing answered twice
