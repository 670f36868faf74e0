"""The real stack of one fault-matrix case: private names, a result tap, waits on
observable state, and requests.

Every case gets its own exchanges and queues (worker_harness.private_settings), its own
ledger database and its own object prefix, so the invariant checker looks at this case's
requests only.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aio_pika
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, select

from tests.integration.fault_matrix.invariants import BrokerView, Sighting
from tests.integration.worker_harness import delete_private_topology, private_settings
from zimage_pipeline.broker import connect_robust
from zimage_pipeline.decoding import read_json_object
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.models import Job, QuotaReservation
from zimage_pipeline.messages import Priority
from zimage_pipeline.ports import Engine as Engine_
from zimage_pipeline.ports import ImageSpec, ModelIdentity, RawImage
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.wiring import Wiring, build
from zimage_pipeline.worker.consumer import COPY_ID_HEADER, REPUBLISHED_AT_HEADER
from zimage_pipeline.worker.topology import (
    ANONYMOUS_WORD,
    DELAY_HEADER,
    declare_exchanges,
    retry_queue_name,
)

# Small on purpose: a crashed worker's job is taken over after this long (the default,
# 120 s, protects a slow job from a duplicate; here it would only make the matrix slow).
JOB_BUSY_S = 3.0


def migrate_ledger(url: str) -> None:
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


def matrix_settings(tiny_model: Path, ledger_url: str, **sections: Mapping[str, Any]) -> Settings:
    """Local-stack settings, private to one case. `sections` override (merge into) the
    defaults below, e.g. `worker={"concurrency": 1}`, `directory={"url": ...}`."""
    base = private_settings()
    migrate_ledger(ledger_url)
    defaults: dict[str, Any] = {
        "broker": base.broker.model_dump(),
        "worker": {
            **base.worker.model_dump(),
            "job_busy_s": JOB_BUSY_S,
            "retry_delays_s": [1],
            "max_attempts": 10,
            "max_job_attempts": 100,  # above any case's max_attempts (directory down: 60)
        },
        "database": {"url": ledger_url},
        "engine": {"model_path": str(tiny_model), "device": "cpu"},
        "storage": {"prefix": f"fm-{uuid.uuid4().hex[:10]}"},
    }
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    return load_settings(**defaults)


SECTIONS = (
    "broker",
    "worker",
    "database",
    "engine",
    "storage",
    "directory",
    "policy",
    "audit",
    "plugins",
)


def overrides_of(settings: Settings) -> dict[str, Any]:
    """The case's settings as plain JSON for a worker subprocess. Secret values are left
    out: the subprocess reads them as every process does (the *_FILE variables)."""
    overrides: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(settings, name)
        values = {
            key: value
            for key, value in section.model_dump(mode="python").items()
            if value is not None and not isinstance(value, SecretStr)
        }
        overrides[name] = json.loads(json.dumps(values, default=str))
    return overrides


def request(request_id: str, on_behalf_of: str = "alice", **fields: Any) -> dict[str, Any]:
    """A small, valid request: 64x64, 2 steps (the tiny model makes that ~0.1 s)."""
    return {
        "request_id": request_id,
        "on_behalf_of": on_behalf_of,
        "prompt": "a lighthouse at dusk, 灯塔",
        "width": 64,
        "height": 64,
        "steps": 2,
        **fields,
    }


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.1,
) -> None:
    """Poll an observable condition (a ledger row, a queue, a process) with a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


class Ledger:
    """Direct reads of the case's ledger, for waiting on states and checking them."""

    def __init__(self, settings: Settings) -> None:
        self.engine: Engine = create_ledger_engine(settings.database)

    def job(self, request_id: str) -> tuple[str, int] | None:
        """(status, attempts) of the request's job row, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Job.status, Job.attempts).where(Job.request_id == request_id)
            ).first()
        return (row.status, row.attempts) if row else None

    def status(self, request_id: str) -> str | None:
        job = self.job(request_id)
        return job[0] if job else None

    def reservation_state(self, request_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(
                select(QuotaReservation.state).where(QuotaReservation.request_id == request_id)
            )

    def event_types(self, request_id: str) -> list[str]:
        from zimage_pipeline.ledger.models import AuditEventRow

        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    select(AuditEventRow.event_type)
                    .where(AuditEventRow.request_id == request_id)
                    .order_by(AuditEventRow.seq)
                )
            )

    def close(self) -> None:
        self.engine.dispose()


class ResultTap:
    """Every result the case's workers publish, from a durable queue (none is missed while
    the broker restarts), in arrival order; and the broker side: every request message
    on the requests exchange (clients' originals and workers' returning copies) and, once
    the case is over, what is left in its queues."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.publishers: list[str | None] = []  # whose routing key each result came under
        self.broker = BrokerView()

    def of(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("request_id") == request_id]

    def first(self, request_id: str) -> dict[str, Any]:
        found = self.of(request_id)
        assert found, f"no result for {request_id}"
        return found[0]

    async def wait_for(
        self, *request_ids: str, count: int = 1, timeout_s: float = 60.0
    ) -> dict[str, dict[str, Any]]:
        """Wait until each id has `count` results; return the first of each."""

        def missing() -> list[str]:
            return [r for r in request_ids if len(self.of(r)) < count]

        try:
            await wait_until(
                lambda: not missing(), f"results of {request_ids}", timeout_s=timeout_s
            )
        except AssertionError:
            seen = {r: [(x["status"], x.get("reason")) for x in self.of(r)] for r in request_ids}
            raise AssertionError(f"results still missing for {missing()}; seen {seen}") from None
        return {r: self.of(r)[0] for r in request_ids}


@asynccontextmanager
async def result_tap(settings: Settings) -> AsyncIterator[ResultTap]:
    tap = ResultTap()
    connection = await connect_robust(settings.broker, name="fault-matrix tap")
    # While the tap's own connection is down, what the broker routes to its queues waits
    # there and is seen only when it is back: its arrival times say when the tap
    # reconnected, not when the broker delivered. Those windows count as outages.
    blind_since: list[int] = []

    def blinded(*_: Any) -> None:
        blind_since.append(int(time.time() * 1000))

    def seeing_again(*_: Any) -> None:
        if blind_since:
            tap.broker.outages.append((blind_since[0], int(time.time() * 1000)))
            blind_since.clear()

    connection.close_callbacks.add(blinded)
    connection.reconnect_callbacks.add(seeing_again)
    try:
        channel = await connection.channel()
        requests, results = await declare_exchanges(channel, settings.broker)
        queue = await channel.declare_queue(
            f"{settings.broker.requests_queue}.tap",
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        await queue.bind(results, routing_key="result.#")
        # A second binding of the requests exchange's routing keys: the broker copies
        # every request message here as well as to the worker's queue.
        sightings = await channel.declare_queue(
            f"{settings.broker.requests_queue}.tap-requests",
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        for priority in Priority:
            await sightings.bind(requests, routing_key=priority.value)

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                tap.results.append(json.loads(message.body))
                tap.publishers.append(publisher_of(message.routing_key or ""))

        async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                tap.broker.sightings.append(sighting_of(message))

        await queue.consume(on_result)
        await sightings.consume(on_request)
        yield tap
        await queue.delete(if_unused=False, if_empty=False)
        await sightings.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


def publisher_of(routing_key: str) -> str | None:
    """The account a result was routed to: `result.<publisher word>.<status>...`."""
    parts = routing_key.split(".")
    return unquote(parts[1]) if len(parts) > 2 and parts[1] != ANONYMOUS_WORD else None


def sighting_of(message: aio_pika.abc.AbstractIncomingMessage) -> Sighting:
    headers = message.headers or {}
    document = read_json_object(message.body, max_bytes=len(message.body) + 1)
    rid = document.get("request_id") if document else None
    delay = headers.get(DELAY_HEADER)
    published = headers.get(REPUBLISHED_AT_HEADER)
    copy_id = headers.get(COPY_ID_HEADER)
    return Sighting(
        request_id=rid if isinstance(rid, str) else None,
        copy_id=str(copy_id) if copy_id is not None else None,
        delay_s=float(str(delay).removesuffix("s")) if delay is not None else None,
        republished_at_ms=int(published) if isinstance(published, int) else None,
        arrived_at_ms=int(time.time() * 1000),
    )


async def read_leftover(settings: Settings) -> dict[str, int]:
    """Messages still in each of the case's request, control and delay queues."""
    b = settings.broker
    names = [f"{b.requests_queue}.{p.value}" for p in Priority]
    names.append(f"{b.requests_queue}.control")
    names += [retry_queue_name(b, d) for d in sorted({1, *settings.worker.retry_delays_s})]
    counts: dict[str, int] = {}
    connection = await connect_robust(b, name="fault-matrix leftovers")
    async with connection:
        for name in names:
            channel = await connection.channel()  # a failed passive declare closes it
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue  # never declared: nothing can be left in it
            counts[name] = queue.declaration_result.message_count or 0
    return counts


@asynccontextmanager
async def case_stack(settings: Settings) -> AsyncIterator[tuple[ResultTap, Ledger]]:
    """The tap and ledger reader of one case; its queues and exchanges are deleted after."""
    ledger = Ledger(settings)
    try:
        async with result_tap(settings) as tap:
            yield tap, ledger
            # The workers have stopped: whatever is still queued was never answered.
            tap.broker.leftover = await read_leftover(settings)
    finally:
        ledger.close()
        await delete_private_topology(settings)


@asynccontextmanager
async def wired(settings: Settings) -> AsyncIterator[Wiring]:
    """The real adapters, built as `zimage-pipeline worker` builds them (off the loop)."""
    wiring = await asyncio.to_thread(build, settings)
    try:
        yield wiring
    finally:
        for close in wiring.closers:
            close()


class CountingEngine:
    """The real engine, counting the images it is asked for (a regeneration shows up),
    optionally slowed so that a fault lands while requests are in flight."""

    def __init__(self, inner: Engine_, *, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.images = 0
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    @property
    def identity(self) -> ModelIdentity:
        return self.inner.identity

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        with self._lock:
            self.images += len(specs)
            self.prompts += [s.prompt for s in specs]
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.generate(specs)
