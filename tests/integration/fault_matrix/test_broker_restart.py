"""Case 3: RabbitMQ restarts in the middle of a stream. The worker notices, reconnects
and consumes again by itself; every request is answered, none generated twice.

The broker is the shared one, so the restart holds the team's services lock for its
whole duration (nobody benchmarks or restarts it meanwhile)."""

from __future__ import annotations

import asyncio
import os
import subprocess
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
from tests.integration.worker_harness import Client, client, running_worker

pytestmark = pytest.mark.integration

# The team's convention for whoever restarts a shared service (or times a benchmark).
SERVICES_LOCK = os.environ.get("ZIMAGE_SERVICES_LOCK", "/tmp/zimage-services.lock")
BEFORE, AFTER = 8, 4


def restart_broker() -> None:
    subprocess.run(
        [
            "flock",
            SERVICES_LOCK,
            "sh",
            "-c",
            "rabbitmqctl -q stop_app && rabbitmqctl -q start_app",
        ],
        check=True,
        timeout=300,
    )


async def publish_when_possible(alice: Client, body: dict[str, object]) -> None:
    """The client's own connection is reconnecting too: retry until it takes the message."""
    for _ in range(120):
        try:
            await alice.publish(body)
            return
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
            await asyncio.sleep(0.5)
    raise AssertionError("the client could not publish after the broker restart")


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

            await asyncio.to_thread(restart_broker)
            await wait_until(
                lambda: running.worker.ready and running.worker.connections_opened >= 2,
                "the worker to reconnect and consume again by itself",
                timeout_s=90,
            )
            for rid in ids[BEFORE:]:
                await publish_when_possible(alice, request(rid))
            await tap.wait_for(*ids, timeout_s=120)
    assert {tap.first(r)["status"] for r in ids} == {"succeeded"}
    assert counting.images == len(ids)  # a redelivery republishes, never regenerates
    assert_invariants(settings, tap.results, expected=set(ids))
