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

import aio_pika
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, select

from tests.integration.worker_harness import delete_private_topology, private_settings
from zimage_pipeline.broker import connect_robust
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.models import Job, QuotaReservation
from zimage_pipeline.ports import Engine as Engine_
from zimage_pipeline.ports import ImageSpec, ModelIdentity, RawImage
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.wiring import Wiring, build
from zimage_pipeline.worker.topology import declare_exchanges

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


SECTIONS = ("broker", "worker", "database", "engine", "storage", "directory", "policy", "audit")


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
    the broker restarts), in arrival order."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

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
    try:
        channel = await connection.channel()
        _, results = await declare_exchanges(channel, settings.broker)
        queue = await channel.declare_queue(
            f"{settings.broker.requests_queue}.tap",
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        await queue.bind(results, routing_key="result.#")

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                tap.results.append(json.loads(message.body))

        await queue.consume(on_result)
        yield tap
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


@asynccontextmanager
async def case_stack(settings: Settings) -> AsyncIterator[tuple[ResultTap, Ledger]]:
    """The tap and ledger reader of one case; its queues and exchanges are deleted after."""
    ledger = Ledger(settings)
    try:
        async with result_tap(settings) as tap:
            yield tap, ledger
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
