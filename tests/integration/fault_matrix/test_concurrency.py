"""Cases 9 and 10: two workers (each with its own adapters and database pool, as two
processes would have) on one PostgreSQL ledger.

9. The same request_id delivered twice at once, one copy to each worker: generated and
   charged once, both copies answered with the same result.
10. A quota race: more requests than the quota allows, served by both workers at once:
    exactly the quota is granted, never more.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.stack import (
    CountingEngine,
    case_stack,
    matrix_settings,
    request,
    wired,
)
from tests.integration.quota_support import counter
from tests.integration.worker_harness import client, running_worker
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_types import user_subject

pytestmark = pytest.mark.integration


async def test_same_request_id_twice_at_once_on_two_workers_generates_once(
    tiny_model: Path, postgres_url: str
) -> None:
    # prefetch 1, concurrency 1: while a worker holds one copy, the broker must hand the
    # other copy to the other worker, so every duplicate really meets a busy twin.
    settings = matrix_settings(tiny_model, postgres_url, worker={"prefetch": 1, "concurrency": 1})
    ids = [f"twice-{i}" for i in range(3)]
    async with (
        case_stack(settings) as (tap, ledger),
        wired(settings) as wiring_a,
        wired(settings) as wiring_b,
        client(settings, "alice") as alice,
    ):
        engine_a = CountingEngine(wiring_a.ports.engine, delay_s=0.5)
        engine_b = CountingEngine(wiring_b.ports.engine, delay_s=0.5)
        async with (
            running_worker(settings, replace(wiring_a.ports, engine=engine_a), worker_id="a"),
            running_worker(settings, replace(wiring_b.ports, engine=engine_b), worker_id="b"),
        ):
            for rid in ids:
                await alice.publish(request(rid))
                await alice.publish(request(rid))
            await tap.wait_for(*ids, count=2)
        assert engine_a.images + engine_b.images == len(ids), (engine_a.images, engine_b.images)
        # A duplicate waited for its twin; it never took the live job over.
        assert {ledger.job(rid) for rid in ids} == {("succeeded", 1)}
    world = assert_invariants(settings, tap, expected=set(ids))
    assert len(world.results) == 2 * len(ids)  # both copies answered, identically


async def test_quota_race_across_two_workers_never_overspends(
    tiny_model: Path, postgres_url: str
) -> None:
    quota, requests = 4, 12
    settings = matrix_settings(
        tiny_model, postgres_url, worker={"concurrency": 3, "max_buffered_per_principal": 16}
    )
    ids = [f"race-{i}" for i in range(requests)]
    async with (
        case_stack(settings) as (tap, ledger),
        wired(settings) as wiring_a,
        wired(settings) as wiring_b,
        client(settings, "alice") as alice,
    ):
        QuotaLedger(ledger.engine).set_limit(
            user_subject("alice"), images_per_day=quota, images_per_month=None, actor="test"
        )
        engine_a = CountingEngine(wiring_a.ports.engine, delay_s=0.3)
        engine_b = CountingEngine(wiring_b.ports.engine, delay_s=0.3)
        async with (
            running_worker(settings, replace(wiring_a.ports, engine=engine_a), worker_id="a"),
            running_worker(settings, replace(wiring_b.ports, engine=engine_b), worker_id="b"),
        ):
            # Both consume: the broker alternates the deliveries between them, and each
            # reserves for three at once, so six reservations race for four images.
            for rid in ids:
                await alice.publish(request(rid))
            await tap.wait_for(*ids)
        outcomes = [(tap.first(r)["status"], tap.first(r).get("reason")) for r in ids]
        assert outcomes.count(("succeeded", None)) == quota, outcomes
        assert outcomes.count(("rejected", "QUOTA_EXCEEDED")) == requests - quota, outcomes
        assert engine_a.images > 0 and engine_b.images > 0  # both workers served
        assert engine_a.images + engine_b.images == quota  # refused before generating
        assert counter(ledger.engine, "user:alice", "day") == (quota, 0, 0)
    assert_invariants(settings, tap, expected=set(ids))
