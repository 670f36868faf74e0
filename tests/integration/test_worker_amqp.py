"""The worker against the real RabbitMQ (the other ports are in-memory fakes here; the
end-to-end test wires the real ledger, directory, engine and store)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from tests.fakes import (
    GENEROUS,
    FakeAuthorizer,
    FakeEncoder,
    FakeEngine,
    FakeStore,
    fake_ledger,
)
from tests.integration.worker_harness import (
    broker_dead_letter_resend_s,
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
    ledger = fake_ledger()
    ports = Ports(
        jobs=ledger.jobs,
        authorizer=FakeAuthorizer(
            users={"alice": GENEROUS, "bob": GENEROUS, "carol": GENEROUS},
            delegators={"cms-publisher"},
        ),
        ledger=ledger,
        engine=FakeEngine(),
        encoder=FakeEncoder(),
        store=FakeStore(),
        audit=ledger.audit,
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
    assert ports.ledger.quota.committed == {"r-1": ("alice", 2)}  # type: ignore[attr-defined]


async def test_duplicate_is_answered_again_without_generating_twice(settings: Settings) -> None:
    ports = make_ports()
    async with running_worker(settings, ports), client(settings, "alice") as alice:
        await alice.publish(request("dup-1"))
        first = await alice.next_result()
        await alice.publish(request("dup-1"))
        second = await alice.next_result()
        await alice.publish(request("dup-1", prompt="something else"))
        conflict = await alice.next_result()
    # The same answer, each echoing its own message's id (aio-pika sets a message_id).
    assert first.pop("correlation_id") != second.pop("correlation_id")
    assert first == second
    assert len(ports.engine.calls) == 1  # type: ignore[attr-defined]
    assert conflict["status"] == "rejected" and conflict["reason"] == "REQUEST_ID_CONFLICT"
    # The conflict does not speak for dup-1 (whose outcome is the first's): it names it.
    assert (conflict["request_id"], conflict["claimed_request_id"]) == ("", "dup-1")


async def test_a_republished_answer_is_not_counted_as_another_job(settings: Settings) -> None:
    """Found by a probe: zimage_jobs_total counted every answer, so duplicates inflated
    the succeeded count (and the phase timings) that dashboards and alerts read."""
    from prometheus_client import generate_latest

    async with (
        running_worker(settings, make_ports()) as running,
        client(settings, "alice") as alice,
    ):
        for _ in range(3):
            await alice.publish(request("counted-1"))
            assert (await alice.next_result())["status"] == "succeeded"
        exposed = generate_latest(running.worker._metrics.registry).decode()
    assert 'zimage_jobs_total{reason="",status="succeeded"} 1.0' in exposed
    assert "zimage_images_total 1.0" in exposed


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


async def test_a_deferred_junk_message_is_dead_lettered_under_its_publisher() -> None:
    """Found by a probe: a message the worker deferred (its publisher had its share
    buffered) and then refused reached the DLQ blamed on the worker's own account, with
    the retry path's bookkeeping headers and without its correlation_id."""
    s = private_settings(concurrency=1, max_buffered_per_principal=1, prefetch=8)
    count = 12
    try:
        async with running_worker(s, make_ports()), client(s, "bob") as bob:
            exchange = await bob.channel.get_exchange(s.broker.requests_exchange, ensure=False)
            for i in range(count):
                await exchange.publish(
                    aio_pika.Message(
                        f"junk-{i}".encode(), user_id="bob", correlation_id=f"corr-{i}"
                    ),
                    routing_key="standard",
                )
            results = await bob.results_for(count)
        assert sorted(r["correlation_id"] for r in results) == sorted(
            f"corr-{i}" for i in range(count)
        )
        connection = await connect_robust(s.broker, name="test-dlq-reader")
        async with connection:
            channel = await connection.channel()
            dlq = await channel.declare_queue(f"{s.broker.requests_queue}.dlq", passive=True)
            dead: list[aio_pika.abc.AbstractIncomingMessage] = []
            while (message := await dlq.get(fail=False, no_ack=True)) is not None:
                dead.append(message)
        assert len(dead) == count
        deferred = [m for m in dead if "x-zimage-attempt" in (m.headers or {})]
        assert deferred, "no message was deferred: the case did not happen"
        for message in dead:
            headers = message.headers or {}
            assert headers["x-zimage-original-user-id"] == "bob"
            assert message.correlation_id == f"corr-{message.body.decode().split('-')[1]}"
            internal = {"x-zimage-principal", "x-zimage-copy-id", "x-zimage-last-reason"}
            assert not internal & set(headers), headers
    finally:
        await delete_private_topology(s)


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
    assert "deleg-1" not in ports.ledger.quota.committed  # type: ignore[attr-defined]


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
        assert "store-down-1" in ports.ledger.quota.released  # type: ignore[attr-defined]
        assert "store-down-1" not in ports.ledger.quota.committed  # type: ignore[attr-defined]
    finally:
        await delete_private_topology(s)


async def test_heartbeats_survive_a_long_generation(settings: Settings) -> None:
    """Heartbeat 2 s; a 7 s generation runs on the GPU thread, the loop keeps answering
    heartbeats, so the connection is never dropped (no reconnect happens)."""
    ports = make_ports(engine=FakeEngine(delay_s=7.0))
    async with running_worker(settings, ports) as running, client(settings, "alice") as alice:
        await alice.publish(request("slow-1"))
        result = await alice.next_result(wait_s=40)
        assert running.worker.ready
        connections = running.worker.connections_opened
    assert result["status"] == "succeeded"
    assert connections == 1  # never dropped, never reconnected


async def test_a_deleted_queue_is_declared_again_and_consumed(settings: Settings) -> None:
    """Found by a probe: deleting a request queue under a running worker made the broker
    cancel its consumer, and the worker went on saying ready while consuming nothing.
    Now a broker-side cancel is handled like a lost connection: not ready, reconnect,
    the topology declared again, consuming again; a request on that queue is served."""
    bulk = f"{settings.broker.requests_queue}.bulk"
    ports = make_ports()
    async with running_worker(settings, ports) as running, client(settings, "bob") as bob:
        assert running.worker.ready and running.worker.connections_opened == 1
        admin = await connect_robust(settings.broker, name="test-admin")
        async with admin:
            channel = await admin.channel()
            await channel.queue_delete(bulk)
            for _ in range(200):  # 20 s
                if running.worker.connections_opened == 2 and running.worker.ready:
                    break
                await asyncio.sleep(0.1)
            assert running.worker.connections_opened == 2  # it noticed and reconnected
            assert running.worker.ready
            again = await channel.declare_queue(bulk, passive=True)
            assert again.declaration_result.consumer_count == 1
        await bob.publish(request("after-delete-1", on_behalf_of="bob"), priority="bulk")
        result = await bob.next_result(wait_s=30)
    assert (result["request_id"], result["status"]) == ("after-delete-1", "succeeded")


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
                await cms.result_of("hero-1")
                await bob.results_for(5)
        # Each publisher reads only its own results: compare when they arrived.
        arrivals = {**bob.arrived_at, **cms.arrived_at}
        order = sorted(arrivals, key=arrivals.__getitem__)
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
                await alice.result_of("alice-1", wait_s=60)
                await bob.results_for(40, wait_s=60)
        # Each publisher reads only its own results: compare when they arrived.
        arrivals = {**bob.arrived_at, **alice.arrived_at}
        order = sorted(arrivals, key=arrivals.__getitem__)
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
    assert "cx-1" not in ports.ledger.quota.committed  # type: ignore[attr-defined]


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


@pytest.mark.timeout(600)  # the broker's dead-letter resend interval, 180 s by default
async def test_broker_restart_mid_stream_loses_nothing(settings: Settings) -> None:
    """Given a stream of requests in progress, when RabbitMQ restarts, the worker's robust
    connection comes back by itself and every request gets its answer, generated once."""
    import subprocess

    ports = make_ports(engine=FakeEngine(delay_s=0.2))
    async with (
        running_worker(settings, ports) as running,
        client(settings, "alice", durable_tap=True) as alice,
    ):
        for i in range(10):
            await alice.publish(request(f"restart-{i}"))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60
        )
        await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "-q", "start_app"], check=True, timeout=120
        )
        for _ in range(120):  # the worker reconnects and consumes again
            if running.worker.ready and running.worker.connections_opened == 2:
                break
            await asyncio.sleep(0.5)
        for i in range(10, 15):
            for _ in range(60):  # the client's own connection is reconnecting too
                try:
                    await alice.publish(request(f"restart-{i}"))
                    break
                except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
                    await asyncio.sleep(0.5)
        # A copy a worker sent to a delay queue just before or after the restart can
        # expire while its priority queue is still recovering: the broker keeps it and
        # sends it again after its dead-letter resend interval. Not lost; wait for it.
        deadline = time.monotonic() + 90 + await asyncio.to_thread(broker_dead_letter_resend_s)
        seen: set[str] = set()
        while len(seen) < 15:
            try:
                wait_s = max(1.0, deadline - time.monotonic())
                seen.add((await alice.next_result(wait_s=wait_s))["request_id"])
            except TimeoutError:
                queues = await asyncio.to_thread(
                    subprocess.run,
                    [
                        "rabbitmqctl",
                        "-q",
                        "list_queues",
                        "name",
                        "messages",
                        "messages_unacknowledged",
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                mine = [
                    q
                    for q in queues.stdout.splitlines()
                    if settings.broker.requests_queue in q
                    or "tap" in q
                    or settings.broker.results_exchange in q
                ]
                raise AssertionError(f"answered only {sorted(seen)}; queues: {mine}") from None
    assert seen == {f"restart-{i}" for i in range(15)}
    generated = [spec.prompt for call in ports.engine.calls for spec in call]  # type: ignore[attr-defined]
    assert len(generated) == 15  # a redelivery after the restart republishes, never regenerates


async def test_fatal_error_stops_the_worker_non_zero_and_requeues(settings: Settings) -> None:
    from zimage_pipeline.errors import Disposition, ZImageError

    class StickyCudaError(ZImageError):
        disposition = Disposition.FATAL
        reason = "GPU_FAILED"

    class BrokenEngine(FakeEngine):
        def generate(self, specs):  # type: ignore[no-untyped-def]
            raise StickyCudaError("CUDA error: an illegal memory access was encountered")

    async with running_worker(settings, make_ports()):
        pass  # declare the topology
    async with client(settings, "alice") as alice:
        async with running_worker(settings, make_ports(engine=BrokenEngine())) as running:
            await alice.publish(request("fatal-1"))
            code = await asyncio.wait_for(running.task, 30)
        assert code == 70
        # The delivery went back to the queue: a healthy worker answers it.
        async with running_worker(settings, make_ports()):
            result = await alice.result_of("fatal-1")
    assert result["status"] == "succeeded"


async def test_health_readiness_and_metrics_over_http(settings: Settings) -> None:
    from zimage_pipeline.observability import Metrics
    from zimage_pipeline.worker.health import HealthServer

    async def get(port: int, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        await writer.drain()
        raw = (await reader.read()).decode()
        writer.close()
        return int(raw.split(" ", 2)[1]), raw.split("\r\n\r\n", 1)[1]

    ready = {"value": False}
    metrics = Metrics()
    metrics.jobs.labels("succeeded", "").inc()
    server = HealthServer(
        registry=metrics.registry, is_ready=lambda: ready["value"], host="127.0.0.1", port=0
    )
    await server.start()
    try:
        assert await get(server.port, "/healthz") == (200, "ok\n")
        assert (await get(server.port, "/readyz"))[0] == 503
        ready["value"] = True
        assert (await get(server.port, "/readyz"))[0] == 200
        status, body = await get(server.port, "/metrics")
        assert status == 200 and 'zimage_jobs_total{reason="",status="succeeded"} 1.0' in body
        assert (await get(server.port, "/nope"))[0] == 404
    finally:
        await server.stop()
