"""Cases 11 to 13: what goes over the wire when deliveries are republished (issue #14).

Each republish (a fairness deferral, a duplicate waiting for its busy twin, a retry after
a transient failure) must put exactly one copy in exactly one delay queue, which comes
back once, after the delay it asked for. Several delay queues are declared here
(`retry_delays_s = [1, 2, 3]`): with one, a copy that lands in every delay queue looks
the same as a copy that lands in the right one.

11. A burst of 50 requests for one principal against two workers: most are deferred
    (two may wait per principal), every message gets exactly one result.
12. A duplicate arriving while its twin runs waits in a delay queue and is answered
    from the ledger: two messages, two results, one generation.
13. A retry that happens three times: three copies, with delays of 1, 2 and 3 s.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.stack import (
    CountingEngine,
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.worker_harness import client, running_worker
from zimage_pipeline.errors import DependencyUnavailable
from zimage_pipeline.ports import Engine, ImageSpec, ModelIdentity, RawImage

pytestmark = pytest.mark.integration

DELAYS = [1, 2, 3]


async def test_burst_of_50_for_one_principal_on_two_workers_one_result_each(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(
        tiny_model,
        postgres_url,
        worker={"retry_delays_s": DELAYS, "max_buffered_per_principal": 2, "concurrency": 2},
    )
    ids = [f"burst-{i}" for i in range(50)]
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring_a,
        wired(settings) as wiring_b,
        client(settings, "alice") as alice,
    ):
        async with (
            running_worker(settings, wiring_a.ports, worker_id="a"),
            running_worker(settings, wiring_b.ports, worker_id="b"),
        ):
            for rid in ids:
                await alice.publish(request(rid), priority="standard")
            await tap.wait_for(*ids, timeout_s=180)
        deferred = [s for s in tap.broker.sightings if s.copy_id is not None]
        assert deferred, "the burst was never deferred: the case tests nothing"
        assert {s.delay_s for s in deferred} == {1.0}  # fairness deferrals wait 1 s
    world = assert_invariants(settings, tap, expected=set(ids))
    assert len(world.results) == len(ids)


async def test_duplicate_arriving_while_its_twin_runs_is_answered_once_more(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(
        tiny_model, postgres_url, worker={"retry_delays_s": DELAYS, "concurrency": 2}
    )
    rid = "twin-running"
    async with (
        case_stack(settings) as (tap, ledger),
        wired(settings) as wiring,
        client(settings, "alice") as alice,
    ):
        engine = CountingEngine(wiring.ports.engine, delay_s=2.0)
        async with running_worker(settings, replace(wiring.ports, engine=engine)):
            await alice.publish(request(rid))
            await wait_until(lambda: ledger.status(rid) == "running", "the twin running")
            await alice.publish(request(rid))
            await tap.wait_for(rid, count=2, timeout_s=60)
        assert engine.images == 1
        waits = [s for s in tap.broker.sightings if s.copy_id is not None]
        assert waits and {s.delay_s for s in waits} == {1.0}  # retry_delays_s[0]
    world = assert_invariants(settings, tap, expected={rid})
    assert len(world.results) == 2


class FlakyEngine:
    """The real engine behind `failures` transient errors (a GPU host's shared
    filesystem, say): each is retried through the next delay queue."""

    def __init__(self, inner: Engine, *, failures: int) -> None:
        self.inner = inner
        self.failures_left = failures
        self._lock = threading.Lock()

    @property
    def identity(self) -> ModelIdentity:
        return self.inner.identity

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        with self._lock:
            failing = self.failures_left > 0
            self.failures_left -= failing
        if failing:
            raise DependencyUnavailable("model files unreachable (injected)")
        return self.inner.generate(specs)


async def test_a_retry_three_times_uses_each_delay_once(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(tiny_model, postgres_url, worker={"retry_delays_s": DELAYS})
    rid = "retried-thrice"
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        client(settings, "alice") as alice,
    ):
        engine = FlakyEngine(wiring.ports.engine, failures=3)
        async with running_worker(settings, replace(wiring.ports, engine=engine)):
            await alice.publish(request(rid))
            results = await tap.wait_for(rid, timeout_s=60)
        assert results[rid]["status"] == "succeeded"
        retries = [s for s in tap.broker.sightings if s.copy_id is not None]
        assert sorted(s.delay_s or 0 for s in retries) == [1.0, 2.0, 3.0]
    assert_invariants(settings, tap, expected={rid})
