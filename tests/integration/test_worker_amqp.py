"""The worker against the real RabbitMQ (the other ports are in-memory fakes here; the
end-to-end test wires the real ledger, directory, engine and store)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from tests.fakes import (
    GENEROUS,
    FakeAudit,
    FakeAuthorizer,
    FakeEncoder,
    FakeEngine,
    FakeJobs,
    FakeQuota,
    FakeStore,
)
from tests.integration.worker_harness import (
    client,
    delete_private_topology,
    private_settings,
    running_worker,
)
from zimage_pipeline.broker import connect_robust
from zimage_pipeline.service import Ports
from zimage_pipeline.settings import Settings

pytestmark = pytest.mark.integration


def make_ports(**overrides: Any) -> Ports:
    ports = Ports(
        jobs=FakeJobs(),
        authorizer=FakeAuthorizer(
            users={"alice": GENEROUS, "bob": GENEROUS, "carol": GENEROUS},
            delegators={"cms-publisher"},
        ),
        quota=FakeQuota(),
        engine=FakeEngine(),
        encoder=FakeEncoder(),
        store=FakeStore(),
        audit=FakeAudit(),
    )
    for name, value in overrides.items():
        setattr(ports, name, value)
    return ports


def request(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "on_behalf_of": "alice",
        "prompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        **fields,
    }


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    s = private_settings()
    yield s
    await delete_private_topology(s)


async def test_request_in_result_out(settings: Settings) -> None:
    ports = make_ports()
    async with running_worker(settings, ports), client(settings, "alice") as alice:
        await alice.publish(request("r-1", num_images=2, labels={"cms.asset_id": "A-7"}))
        result = await alice.next_result()
    assert result["status"] == "succeeded", result
    assert result["request_id"] == "r-1"
    assert len(result["images"]) == 2
    assert result["labels"] == {"cms.asset_id": "A-7"}
    assert {"authorize", "reserve", "generate", "encode", "store", "commit"} <= set(
        result["timings_s"]
    )
    assert ports.quota.committed == {"r-1": ("alice", 2)}  # type: ignore[attr-defined]


async def test_duplicate_is_answered_again_without_generating_twice(settings: Settings) -> None:
    ports = make_ports()
    async with running_worker(settings, ports), client(settings, "alice") as alice:
        await alice.publish(request("dup-1"))
        first = await alice.next_result()
        await alice.publish(request("dup-1"))
        second = await alice.next_result()
        await alice.publish(request("dup-1", prompt="something else"))
        conflict = await alice.next_result()
    assert first == second
    assert len(ports.engine.calls) == 1  # type: ignore[attr-defined]
    assert conflict["status"] == "rejected" and conflict["reason"] == "REQUEST_ID_CONFLICT"


async def test_invalid_messages_are_rejected_dead_lettered_and_the_queue_flows(
    settings: Settings,
) -> None:
    ports = make_ports()
    bad_bodies = [
        b"not json",
        b"\xff\xfe",
        json.dumps(request("bad-1", width=-5)).encode(),
        json.dumps({**request("bad-2"), "colour": "red"}).encode(),
        b"x" * 70000,
    ]
    async with running_worker(settings, ports), client(settings, "alice") as alice:
        for body in bad_bodies:
            await alice.publish(body)
        await alice.publish(request("good-1"))
        results = await alice.results_for(len(bad_bodies) + 1)
    by_status: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_status.setdefault(r["status"], []).append(r)
    assert [r["request_id"] for r in by_status["succeeded"]] == ["good-1"]
    rejected = by_status["rejected"]
    assert len(rejected) == len(bad_bodies)
    assert {r["reason"] for r in rejected} == {"INVALID_REQUEST"}
    messages = " | ".join(r["message"] for r in rejected)
    for named in (
        "not valid JSON",
        "UTF-8",
        "width",
        "unknown field(s): colour",
        "exceeds the limit",
    ):
        assert named in messages

    connection = await connect_robust(settings.broker, name="test-dlq-reader")
    async with connection:
        channel = await connection.channel()
        dlq = await channel.declare_queue(f"{settings.broker.requests_queue}.dlq", passive=True)
        dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        while (message := await dlq.get(fail=False, no_ack=True)) is not None:
            dead.append(message)
    assert len(dead) == len(bad_bodies)
    assert all((m.headers or {}).get("x-zimage-reason") == "INVALID_REQUEST" for m in dead)
    assert {m.body for m in dead} == set(bad_bodies)


async def test_spoofed_user_id_is_refused_by_the_broker(settings: Settings) -> None:
    async with running_worker(settings, make_ports()), client(settings, "alice") as alice:
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await alice.publish(request("spoof-1"), user_id="cms-publisher")


async def test_undelegated_on_behalf_of_is_rejected(settings: Settings) -> None:
    ports = make_ports()
    async with (
        running_worker(settings, ports),
        client(settings, "bob") as bob,
        client(settings, "cms-publisher") as cms,
    ):
        await bob.publish(request("deleg-1", on_behalf_of="alice"))
        refused = await bob.result_of("deleg-1")
        await cms.publish(request("deleg-2", on_behalf_of="alice"))
        allowed = await cms.result_of("deleg-2")
    assert refused["status"] == "rejected" and refused["reason"] == "DELEGATION_NOT_ALLOWED"
    assert allowed["status"] == "succeeded" and allowed["on_behalf_of"] == "alice"
    assert "deleg-1" not in ports.quota.committed  # type: ignore[attr-defined]


async def test_transient_failure_is_retried_with_delay_then_succeeds(settings: Settings) -> None:
    ports = make_ports(authorizer=FakeAuthorizer(users={"alice": GENEROUS}, unavailable_times=2))
    async with running_worker(settings, ports), client(settings, "alice") as alice:
        await alice.publish(request("retry-1"))
        result = await alice.next_result(wait_s=30)
    assert result["status"] == "succeeded"
    assert ports.authorizer.calls == 3  # type: ignore[attr-defined]


async def test_retry_budget_spent_fails_and_releases(settings: Settings) -> None:
    s = private_settings(max_attempts=2)
    try:
        ports = make_ports(store=FakeStore(failures=100))
        async with running_worker(s, ports), client(s, "alice") as alice:
            await alice.publish(request("store-down-1"))
            result = await alice.next_result(wait_s=30)
        assert result["status"] == "failed"
        assert "store-down-1" in ports.quota.released  # type: ignore[attr-defined]
        assert "store-down-1" not in ports.quota.committed  # type: ignore[attr-defined]
    finally:
        await delete_private_topology(s)


async def test_heartbeats_survive_a_long_generation(settings: Settings) -> None:
    """Heartbeat 2 s; a 7 s generation runs on the GPU thread, the loop keeps answering
    heartbeats, so the connection is never dropped (no reconnect happens)."""
    ports = make_ports(engine=FakeEngine(delay_s=7.0))
    async with running_worker(settings, ports) as running, client(settings, "alice") as alice:
        reconnects: list[object] = []
        running.connection.reconnect_callbacks.add(lambda *args: reconnects.append(args))
        await alice.publish(request("slow-1"))
        result = await alice.next_result(wait_s=40)
        assert not running.connection.is_closed
    assert result["status"] == "succeeded"
    assert reconnects == []


async def test_interactive_overtakes_bulk(settings: Settings) -> None:
    s = private_settings(concurrency=1, max_buffered_per_principal=50)
    try:
        ports = make_ports(engine=FakeEngine(delay_s=0.3))
        async with running_worker(s, ports):
            pass  # declare the topology, then stop: the requests wait in their queues
        async with client(s, "bob") as bob, client(s, "cms-publisher") as cms:
            for i in range(5):
                await bob.publish(request(f"bulk-{i}", on_behalf_of="bob"), priority="bulk")
            await cms.publish(request("hero-1", on_behalf_of="alice"), priority="interactive")
            async with running_worker(s, ports):
                order = [r["request_id"] for r in await bob.results_for(6)]
        assert order[0] == "hero-1", order
    finally:
        await delete_private_topology(s)


async def test_a_burst_from_one_user_does_not_starve_another(settings: Settings) -> None:
    s = private_settings(concurrency=1, max_buffered_per_principal=1, prefetch=4)
    try:
        ports = make_ports(engine=FakeEngine(delay_s=0.05))
        async with running_worker(s, ports):
            pass  # declare the topology, then stop: the burst waits in the queue
        async with client(s, "bob") as bob, client(s, "alice") as alice:
            for i in range(40):
                await bob.publish(request(f"burst-{i}", on_behalf_of="bob"), priority="bulk")
            await alice.publish(request("alice-1"), priority="bulk")
            async with running_worker(s, ports):
                order = [r["request_id"] for r in await alice.results_for(41, wait_s=60)]
        position = order.index("alice-1")
        assert position < 10, f"alice was served {position + 1}th of 41"
    finally:
        await delete_private_topology(s)


async def test_cancel_before_start_ends_cancelled_with_nothing_charged(settings: Settings) -> None:
    ports = make_ports()
    async with running_worker(settings, ports), client(settings, "alice") as alice:
        await alice.publish({"request_id": "cx-1"}, routing_key="cancel")
        await asyncio.sleep(1.0)
        await alice.publish(request("cx-1"))
        result = await alice.next_result()
    assert result["status"] == "cancelled"
    assert not ports.engine.calls  # type: ignore[attr-defined]
    assert "cx-1" not in ports.quota.committed  # type: ignore[attr-defined]


async def test_shutdown_finishes_in_flight_and_requeues_the_rest(settings: Settings) -> None:
    s = private_settings(concurrency=1, shutdown_grace_s=20)
    try:
        ports = make_ports(engine=FakeEngine(delay_s=1.5))
        async with running_worker(s, ports):
            pass
        async with client(s, "alice") as alice:
            async with running_worker(s, ports) as running:
                for i in range(4):
                    await alice.publish(request(f"drain-{i}"))
                await asyncio.sleep(0.7)  # the first one is generating
                running.stop.set()
                code = await asyncio.wait_for(running.task, 30)
            finished = await alice.results_for(1)
            assert code == 0
            assert finished[0]["status"] == "succeeded"
            assert len(ports.engine.calls) == 1  # type: ignore[attr-defined]
            # The others were requeued, not lost: a new worker answers them.
            async with running_worker(s, ports):
                rest = await alice.results_for(3)
            assert {r["request_id"] for r in rest} == {"drain-1", "drain-2", "drain-3"}
    finally:
        await delete_private_topology(s)
