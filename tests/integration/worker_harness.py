"""Run a Worker in-process against the real RabbitMQ, on a private set of names."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from tests.conftest import require_env, require_port
from zimage_pipeline.broker import connect, connect_robust
from zimage_pipeline.messages import CANCEL_RESULT_SCHEMA
from zimage_pipeline.observability import Metrics
from zimage_pipeline.service import Ports, RequestService, ServiceConfig
from zimage_pipeline.settings import BrokerSettings, Settings, WorkerSettings, load_settings
from zimage_pipeline.wiring import Wiring, build
from zimage_pipeline.worker.consumer import Worker
from zimage_pipeline.worker.topology import results_binding_key


def private_settings(**worker_overrides: Any) -> Settings:
    """Local-stack settings with exchange/queue names unique to this test."""
    require_env("ZIMAGE_BROKER__PASSWORD_FILE")
    require_port("RabbitMQ", 5672)
    tag = uuid.uuid4().hex[:10]
    return load_settings(
        broker={
            "requests_exchange": f"zimage.t{tag}.requests",
            "requests_queue": f"zimage.t{tag}.requests",
            "results_exchange": f"zimage.t{tag}.results",
            "dead_letter_exchange": f"zimage.t{tag}.dlx",
            "heartbeat_s": 2,
        },
        worker={"http_port": 0, "retry_delays_s": [1], "shutdown_grace_s": 10, **worker_overrides},
    )


def client_password(user: str) -> str:
    secrets = Path(require_env("ZIMAGE_TEST_SECRETS_DIR"))
    return (secrets / f"amqp_{user}").read_text(encoding="utf-8").strip()


@dataclass
class Client:
    """A publishing account (its AMQP user is validated by RabbitMQ) plus a results tap."""

    user: str
    connection: AbstractRobustConnection
    channel: AbstractChannel
    broker: BrokerSettings
    results_queue: AbstractQueue
    results: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    # Answers to this client's cancels (zimage.cancel-result/v1), in arrival order.
    cancel_answers: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    stash: dict[str, dict[str, Any]] = field(default_factory=dict)
    # request_id -> when its first result reached this client (time.monotonic()): results
    # of different publishers reach different clients, so order is compared by time.
    arrived_at: dict[str, float] = field(default_factory=dict)

    async def publish(
        self,
        body: bytes | dict[str, Any],
        *,
        priority: str = "standard",
        user_id: str | None = None,
        routing_key: str | None = None,
    ) -> None:
        if isinstance(body, dict) and routing_key is None:
            body = {"priority": priority, **body}  # the routing key and the field agree
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        exchange = await self.channel.get_exchange(self.broker.requests_exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=user_id if user_id is not None else self.user,
            ),
            routing_key=routing_key or priority,
        )

    async def cancel(self, request_id: str) -> None:
        await self.publish({"request_id": request_id}, routing_key="cancel")

    async def next_cancel_answer(self, wait_s: float = 30) -> dict[str, Any]:
        return await asyncio.wait_for(self.cancel_answers.get(), wait_s)

    async def next_result(self, wait_s: float = 30) -> dict[str, Any]:
        return await asyncio.wait_for(self.results.get(), wait_s)

    async def result_of(self, request_id: str, wait_s: float = 30) -> dict[str, Any]:
        """The next result for `request_id`; others seen meanwhile are kept for later."""
        if request_id in self.stash:
            return self.stash.pop(request_id)
        while True:
            result = await self.next_result(wait_s)
            if result["request_id"] == request_id:
                return result
            self.stash.setdefault(result["request_id"], result)

    async def results_for(self, count: int, wait_s: float = 60) -> list[dict[str, Any]]:
        return [await self.next_result(wait_s) for _ in range(count)]


@asynccontextmanager
async def client(
    settings: Settings, user: str, *, durable_tap: bool = False
) -> AsyncIterator[Client]:
    """`durable_tap`: results land in a durable queue, as a real CMS consumer's do, so
    none are missed while this client itself is disconnected (a broker restart)."""
    connection = await connect_robust(
        settings.broker, login=user, password=client_password(user), name=f"test-client {user}"
    )
    channel = await connection.channel()
    if durable_tap:
        # Named under the account: the only named queues its permissions allow.
        queue = await channel.declare_queue(f"{user}.tap-{uuid.uuid4().hex}", durable=True)
    else:
        queue = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(settings.broker.results_exchange, ensure=False)
    await queue.bind(exchange, routing_key=results_binding_key(user))
    await queue.bind(exchange, routing_key=f"cancel.{user}.#")
    c = Client(user, connection, channel, settings.broker, queue)

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            result = json.loads(message.body)
            if result.get("schema") == CANCEL_RESULT_SCHEMA:
                await c.cancel_answers.put(result)
                return
            c.arrived_at.setdefault(str(result.get("request_id")), time.monotonic())
            await c.results.put(result)

    await queue.consume(on_result)
    try:
        yield c
    finally:
        if durable_tap:
            await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


# RabbitMQ's default for the key below (3.10 and later).
DEFAULT_DEAD_LETTER_RESEND_S = 180.0


def broker_dead_letter_resend_s() -> float:
    """How long the local broker waits before re-sending an at-least-once dead-lettered
    message that its target queue did not confirm (`dead_letter_worker_publisher_confirm_timeout`).

    A delay-queue copy that expires while its target quorum queue is still recovering from
    a broker restart is kept, not lost, and comes back after this long: tests that restart
    the broker wait for it. `scripts/services.sh` lowers it on the local stack."""
    found = subprocess.run(
        [
            "rabbitmqctl",
            "eval",
            "application:get_env(rabbit, dead_letter_worker_publisher_confirm_timeout).",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"\{ok,\s*(\d+)\}", found.stdout)
    return int(match.group(1)) / 1000 if match else DEFAULT_DEAD_LETTER_RESEND_S


@dataclass
class RunningWorker:
    worker: Worker
    stop: asyncio.Event
    task: asyncio.Task[int]


@asynccontextmanager
async def running_worker(
    settings: Settings, ports: Ports, *, worker_id: str = "test-worker"
) -> AsyncIterator[RunningWorker]:
    gpu = ThreadPoolExecutor(max_workers=1)
    io = ThreadPoolExecutor(max_workers=4)
    service = RequestService(
        ports,
        ServiceConfig(worker_id=worker_id, max_job_attempts=settings.worker.max_job_attempts),
        gpu_executor=gpu,
        io_executor=io,
    )
    worker = Worker(
        connect=lambda: connect(settings.broker, name="test-worker"),
        broker=settings.broker,
        settings=settings.worker,
        service=service,
        metrics=Metrics(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run_until(stop))
    for _ in range(100):
        if worker.ready:
            break
        await asyncio.sleep(0.05)
    try:
        yield RunningWorker(worker, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        gpu.shutdown(wait=False)
        io.shutdown(wait=False)


async def delete_private_topology(settings: Settings, worker: WorkerSettings | None = None) -> None:
    """Remove the test's queues and exchanges (they are durable)."""
    b = settings.broker
    connection = await connect_robust(b, name="test-cleanup")
    async with connection:
        channel = await connection.channel()
        names = [
            f"{b.requests_queue}.{p}" for p in ("interactive", "standard", "bulk", "control", "dlq")
        ]
        names += [f"{b.requests_queue}.retry.{d}s" for d in {1, *settings.worker.retry_delays_s}]
        names.append(f"{b.results_exchange}.unrouted")
        for name in names:
            await channel.queue_delete(name)
        for name in (
            b.requests_exchange,
            f"{b.requests_exchange}.retry",
            b.results_exchange,
            f"{b.results_exchange}.unrouted",
            b.dead_letter_exchange,
        ):
            await channel.exchange_delete(name)


@asynccontextmanager
async def built(settings: Settings) -> AsyncIterator[Wiring]:
    """The real adapters for `settings`, built as the worker builds them; closed, and the
    test's private topology deleted, afterwards."""
    wiring = build(settings)
    try:
        yield wiring
    finally:
        for close in wiring.closers:
            close()
        await delete_private_topology(settings)
