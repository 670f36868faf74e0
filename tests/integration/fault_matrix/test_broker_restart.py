"""Case 3: RabbitMQ restarts in the middle of a stream. The worker notices, reconnects
and consumes again by itself; every request is answered, none generated twice.

The broker is the shared one, so the restart holds the team's services lock for its
whole duration (nobody benchmarks or restarts it meanwhile)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import aio_pika
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
from tests.integration.worker_harness import (
    Client,
    broker_dead_letter_resend_s,
    client,
    running_worker,
)

pytestmark = pytest.mark.integration

# The team's convention for whoever restarts a shared service (or times a benchmark).
SERVICES_LOCK = Path(os.environ.get("ZIMAGE_SERVICES_LOCK", "/tmp/zimage-services.lock"))
LOCK_WAIT_S = 300.0
BEFORE, AFTER = 8, 4


def _inherited_lock() -> int | None:
    """The descriptor of the services lock this process inherited, if any: a run started
    as `flock <lock> scripts/test.sh` holds the lock for all its tests and hands its
    locked descriptor down (flock(1) keeps it open for the command). Locking the file
    anew would wait for ourselves."""
    for entry in Path("/proc/self/fd").iterdir():
        with suppress(OSError):
            if entry.readlink() == SERVICES_LOCK.resolve():
                return int(entry.name)
    return None


def _acquire(fd: int) -> None:
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{SERVICES_LOCK} held by someone else for {LOCK_WAIT_S:.0f}s"
                ) from None
            time.sleep(0.5)


@contextmanager
def services_lock() -> Iterator[None]:
    inherited = _inherited_lock()
    if inherited is not None:
        # The holder's own open file description: taken at once when our ancestor holds
        # it. Never unlocked here, that would release it for the whole run.
        _acquire(inherited)
        yield
        return
    with SERVICES_LOCK.open("a") as handle:
        _acquire(handle.fileno())
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def restart_broker() -> None:
    with services_lock():
        for step in ("stop_app", "start_app"):
            subprocess.run(["rabbitmqctl", "-q", step], check=True, timeout=120)


async def publish_when_possible(alice: Client, body: dict[str, object]) -> None:
    """The client's own connection is reconnecting too: retry until it takes the message."""
    for _ in range(120):
        try:
            await alice.publish(body)
            return
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
            await asyncio.sleep(0.5)
    raise AssertionError("the client could not publish after the broker restart")


@pytest.mark.timeout(600)  # the broker's dead-letter resend interval, 180 s by default
async def test_broker_restart_mid_stream_consumers_return_nothing_lost(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    ids = [f"mq-{i}" for i in range(BEFORE + AFTER)]
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        client(settings, "alice") as alice,
    ):
        counting = CountingEngine(wiring.ports.engine, delay_s=0.3)  # a stream in flight
        ports = replace(wiring.ports, engine=counting)
        async with running_worker(settings, ports, worker_id="reconnecting") as running:
            for rid in ids[:BEFORE]:
                await alice.publish(request(rid))
            await wait_until(lambda: sum(bool(tap.of(r)) for r in ids) >= 2, "two answers")

            stopped_ms = int(time.time() * 1000)
            await asyncio.to_thread(restart_broker)
            tap.broker.outages.append((stopped_ms, int(time.time() * 1000)))
            resend_s = await asyncio.to_thread(broker_dead_letter_resend_s)
            tap.broker.dead_letter_resend_s = resend_s
            await wait_until(
                lambda: running.worker.ready and running.worker.connections_opened >= 2,
                "the worker to reconnect and consume again by itself",
                timeout_s=90,
            )
            for rid in ids[BEFORE:]:
                await publish_when_possible(alice, request(rid))
            await tap.wait_for(*ids, timeout_s=120 + resend_s)
    assert {tap.first(r)["status"] for r in ids} == {"succeeded"}
    assert counting.images == len(ids)  # a redelivery republishes, never regenerates
    # A delivery whose ack the restart lost comes back and is answered again (the stored
    # result republished, nothing generated: counted above), as often as a connection
    # drops under it: at-least-once, bounded by the deliveries in flight.
    # The tap saw the restart too: its own reconnection is an outage it recorded.
    assert len(tap.broker.outages) >= 2, tap.broker.outages
    assert_invariants(settings, tap, expected=set(ids), extra_results=BEFORE)
