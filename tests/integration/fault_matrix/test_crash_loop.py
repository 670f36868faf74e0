"""Beyond the ten cases: a request that kills every worker that runs it.

The broker's delivery limit cannot end this loop: the redelivery finds the dead worker's
job busy and comes back through a delay queue as a new message, with a new delivery
count. The ledger counts the starts instead: after `max_job_attempts` the next worker
ends the request failed ATTEMPTS_EXHAUSTED without running it, publishes that result and
dead-letters the message; the reservation is released and nothing is left behind."""

from __future__ import annotations

import signal
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
from tests.integration.fault_matrix.test_poison import dead_letters, header
from tests.integration.worker_harness import client, running_worker

pytestmark = pytest.mark.integration

MAX_JOB_ATTEMPTS = 2


async def test_request_that_kills_its_workers_ends_after_max_job_attempts(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = matrix_settings(
        tiny_model,
        postgres_url,
        worker={"max_attempts": 1, "max_job_attempts": MAX_JOB_ATTEMPTS},
    )
    rid = "crash-loop"
    victims: list[WorkerProcess] = []
    try:
        async with (
            case_stack(settings) as (tap, ledger),
            client(settings, "alice") as alice,
            wired(settings) as wiring,
        ):
            for start in range(1, MAX_JOB_ATTEMPTS + 1):
                victim = WorkerProcess(
                    settings,
                    tmp_path / f"victim-{start}.log",
                    worker_id=f"victim-{start}",
                    faults={"crash_on_prompt": "POISON"},
                )
                victims.append(victim)
                if start == 1:
                    await victim.wait_ready()
                    await alice.publish(request(rid, prompt="POISON: kills its worker"))
                # A later victim gets the redelivery the moment it consumes, and may die
                # before it ever reports ready: wait for its death, not its readiness.
                await exited_with(victim, -signal.SIGKILL)
                await wait_until(
                    lambda n=start: ledger.job(rid) == ("running", n),  # type: ignore[misc]
                    f"start {start} recorded",
                )

            counting = CountingEngine(wiring.ports.engine)
            async with running_worker(
                settings, replace(wiring.ports, engine=counting), worker_id="rescuer"
            ):
                result = (await tap.wait_for(rid))[rid]
                await alice.publish(request("after-crash-loop"))
                after = (await tap.wait_for("after-crash-loop"))["after-crash-loop"]
            dead = await dead_letters(settings)
        assert (result["status"], result["reason"]) == ("failed", "ATTEMPTS_EXHAUSTED"), result
        assert f"started {MAX_JOB_ATTEMPTS + 1} times" in result["message"]
        assert counting.prompts == ["a lighthouse at dusk, 灯塔"]  # only the good request ran
        assert after["status"] == "succeeded"
        assert ledger.job(rid) == ("failed", MAX_JOB_ATTEMPTS + 1)
        assert ledger.reservation_state(rid) == "released"
        assert [header(m, "x-zimage-reason") for m in dead] == ["ATTEMPTS_EXHAUSTED"]
    finally:
        for victim in victims:
            victim.stop()
    assert_invariants(settings, tap, expected={rid, "after-crash-loop"})
