"""Cases 1 and 2: `kill -9` of a real worker process, mid-generation and on each side of
the ledger commit. Another worker picks the redelivery up; one charge, one set of
objects, the result published (the same one, if it had been published already)."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants, read_objects
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
from zimage_pipeline.storage import ObjectStore

pytestmark = pytest.mark.integration


async def test_kill_9_mid_generation_is_redelivered_and_charged_once(
    tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    rid = "kill-mid-generation"
    # Slow enough that the kill surely lands inside the generation.
    victim = WorkerProcess(
        settings, tmp_path / "victim.log", worker_id="victim", faults={"generate_delay_s": 60}
    )
    try:
        async with (
            case_stack(settings) as (tap, ledger),
            client(settings, "alice") as alice,
            wired(settings) as wiring,  # the rescuer's, built while the victim starts
        ):
            await victim.wait_ready()
            await alice.publish(request(rid, num_images=2))
            await wait_until(
                lambda: ledger.status(rid) == "running" and "FAULT generating" in victim.log(),
                "the victim to be generating",
            )
            victim.kill9()
            await exited_with(victim, -signal.SIGKILL)
            # Nothing stored, nothing charged; the hold is still open (the lease is the
            # backstop if nobody ever came back for it).
            assert read_objects(ObjectStore(settings.storage), settings.storage.prefix) == {}
            assert ledger.reservation_state(rid) == "reserved"

            counting = CountingEngine(wiring.ports.engine)
            ports = replace(wiring.ports, engine=counting)
            async with running_worker(settings, ports, worker_id="rescuer"):
                result = (await tap.wait_for(rid))[rid]
        assert result["status"] == "succeeded", result
        assert len(result["images"]) == 2
        assert ledger.job(rid) == ("succeeded", 2)  # redelivered and taken over once
        assert counting.images == 2  # generated again from the start, same seeds
    finally:
        victim.stop()
    world = assert_invariants(settings, tap, expected={rid})
    assert len(world.objects) == 3  # one set: two images and the audit record


@pytest.mark.parametrize("kill", ["after_store", "before_publish", "after_publish"])
async def test_kill_9_around_the_commit_charges_once_and_publishes(
    kill: str, tiny_model: Path, postgres_url: str, tmp_path: Path
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    rid = f"kill-{kill.replace('_', '-')}"
    victim = WorkerProcess(
        settings, tmp_path / "victim.log", worker_id="victim", faults={"kill": kill}
    )
    try:
        async with (
            case_stack(settings) as (tap, ledger),
            client(settings, "alice") as alice,
            wired(settings) as wiring,
        ):
            await victim.wait_ready()
            await alice.publish(request(rid, num_images=2))
            await exited_with(victim, -signal.SIGKILL)
            assert "FAULT SIGKILL" in victim.log()

            # The state the kill left behind is the one this case is about.
            stored = read_objects(ObjectStore(settings.storage), settings.storage.prefix)
            assert len(stored) == 3, stored  # two images and the audit record
            if kill == "after_store":
                assert ledger.status(rid) == "running"
                assert ledger.reservation_state(rid) == "reserved"
                assert tap.of(rid) == []
            elif kill == "before_publish":
                assert ledger.status(rid) == "succeeded"
                assert ledger.reservation_state(rid) == "committed"
                assert tap.of(rid) == []
            else:
                await tap.wait_for(rid)  # out before the process died, never acked
                assert ledger.status(rid) == "succeeded"

            counting = CountingEngine(wiring.ports.engine)
            ports = replace(wiring.ports, engine=counting)
            async with running_worker(settings, ports, worker_id="rescuer"):
                answers = 2 if kill == "after_publish" else 1
                await tap.wait_for(rid, count=answers)
        assert tap.first(rid)["status"] == "succeeded"
        # Before the commit the request is redone (same seeds, same keys, same bytes);
        # after it, the ledger's result is republished and nothing is generated again.
        assert counting.images == (2 if kill == "after_store" else 0)
    finally:
        victim.stop()
    # Killed after its confirmed publish, before its ack: the redelivery is answered again.
    extra = 1 if kill == "after_publish" else 0
    world = assert_invariants(settings, tap, expected={rid}, extra_results=extra)
    assert len(world.objects) == 3
    assert len(world.results) == (2 if kill == "after_publish" else 1)
