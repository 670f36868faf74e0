"""The result sinks' outbox: a row per (sink, result), delivered at least once or dead.

    enqueue -> pending --claim (lease)--> delivered
                 ^   |                \\-> failed: pending again after a backoff,
                 |___|                     or dead after the sink's max_attempts
    enqueue with the outbox full -> dead ("outbox full"): recorded, never dropped

The AMQP result stays the source of truth; this is a durable copy for the sinks, queued
after the broker confirmed the result. A delivery's id is derived from the sink and the
request (`delivery_id`), so queueing the same result again inserts nothing and every
attempt carries the same id: a receiver drops repeats.

Claiming is optimistic and portable: the dispatcher reads due rows, then moves each
one's `next_attempt_at` to the end of a lease with an UPDATE conditional on the value it
read. Of two workers sharing one PostgreSQL ledger only one matches, so they never both
make the same attempt; a worker that dies mid-attempt leaves the row to come due again
when its lease ends. Every method is one transaction (`txn.run_write`/`run_read`).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, Row, Table, delete, func, select, update

from zimage_pipeline.ledger.outbox_models import (
    DELIVERY_ID_LENGTH,
    LAST_ERROR_LENGTH,
    DeliveryState,
    SinkOutboxRow,
)
from zimage_pipeline.ledger.txn import as_utc, run_read, run_write, upsert_insert, utcnow

__all__ = [
    "Claimed",
    "DeliveryRow",
    "DeliveryState",
    "RetryPolicy",
    "SinkOutbox",
    "delivery_id",
    "full_jitter_delay",
]

log = logging.getLogger(__name__)

OUTBOX = cast(Table, SinkOutboxRow.__table__)
DEFAULT_MAX_PENDING = 100_000
# Errors are stored for operators (`audit show`); the sinks' messages name a host and a
# status, never a secret, and they are cut to the column (with room for the marker).
_ERROR_ROOM = LAST_ERROR_LENGTH - 1

Uniform = Callable[[float, float], float]


def delivery_id(sink: str, request_key: str) -> str:
    """The delivery's id: the same for every attempt and every enqueue of one result."""
    digest = hashlib.sha256(f"{sink}\0{request_key}".encode()).hexdigest()
    return digest[:DELIVERY_ID_LENGTH]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A sink's retries: dead after `max_attempts` attempts; between two, a delay drawn
    at random up to `min(backoff_max_s, backoff_base_s * 2 ** (attempt - 1))`."""

    max_attempts: int = 8
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0


def full_jitter_delay(
    attempt: int, *, base_s: float, max_s: float, uniform: Uniform | None = None
) -> float:
    """Exponential backoff with full jitter (the whole interval is random, so workers
    retrying a receiver that came back do not all hit it at once). Hand-written: the
    project has no retry library, and this is the formula storage/s3.py uses inline."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    draw = uniform or _RANDOM.uniform
    return draw(0.0, ceiling)


_RANDOM = secrets.SystemRandom()


@dataclass(frozen=True, slots=True)
class Claimed:
    """One attempt this worker holds until `lease_until`; `attempt` counts from 1."""

    delivery_id: str
    sink: str
    request_id: str
    event: Mapping[str, Any]
    attempt: int
    lease_until: datetime  # the claim: a failure is recorded only while it still holds
    publisher: str | None = None  # the request's publisher (None: queued before 0007)


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    delivery_id: str
    sink: str
    request_id: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    publisher: str | None = None  # whose result (the sink's route); None before 0007


class SinkOutbox:
    def __init__(
        self,
        engine: Engine,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        uniform: Uniform | None = None,
    ) -> None:
        """`max_pending`: the bound. Past it, a new row is inserted dead ("outbox full"),
        so a receiver down for days cannot grow the ledger without limit, and what was
        not delivered stays on record. `uniform`: the backoff's random draw (tests)."""
        self._engine = engine
        self._max_pending = max_pending
        self._uniform = uniform

    def enqueue(
        self,
        request_id: str,
        event: Mapping[str, Any],
        sinks: Sequence[str],
        *,
        publisher: str | None = None,
        now: datetime | None = None,
    ) -> list[str]:
        """Queue `event` for each sink, due now; the delivery ids, in `sinks`' order.
        `publisher`: the AMQP account whose request it answers, kept for the sinks'
        routing. Idempotent: a (sink, request) already queued, in any state, is left as
        it is."""
        if not sinks:
            return []
        at = now or utcnow()
        ids = [delivery_id(sink, request_id) for sink in sinks]
        document = dict(event)

        def work(connection: Connection) -> list[str]:
            """The sinks whose row was inserted dead because the outbox is full."""
            # Counted in the transaction, so the bound holds for one worker; workers
            # enqueueing at the same moment on PostgreSQL may pass it by a few rows.
            pending = _pending_count(connection)
            refused: list[str] = []
            for sink, id_ in zip(sinks, ids, strict=True):
                row = _new_row(id_, sink, request_id, document, at) | {"publisher": publisher}
                full = pending >= self._max_pending
                if full:
                    row |= _dead(f"outbox full ({pending} pending)", at)
                # RETURNING says whether the row went in (a conflict returns none): the
                # rowcount of INSERT .. ON CONFLICT is -1 through psycopg.
                inserted = connection.execute(
                    upsert_insert(connection, OUTBOX)
                    .values(**row)
                    .on_conflict_do_nothing(index_elements=[OUTBOX.c.delivery_id])
                    .returning(OUTBOX.c.delivery_id)
                ).first()
                if inserted is not None:
                    if full:
                        refused.append(sink)
                    else:
                        pending += 1
            return refused

        for sink in run_write(self._engine, work):
            log.error(
                "result sink %s: outbox full (%d pending), delivery of %s recorded dead",
                sink,
                self._max_pending,
                request_id,
                extra={"fields": {"sink": sink, "request_id": request_id, "state": "dead"}},
            )
        return ids

    def claim_due(self, now: datetime, *, limit: int, lease_s: float) -> list[Claimed]:
        """Claim up to `limit` pending rows due at `now`, oldest due first, each until
        `now + lease_s`. A row another worker claimed between the read and the UPDATE is
        skipped, so this may return fewer than were due."""
        lease_until = now + timedelta(seconds=lease_s)

        def work(connection: Connection) -> list[Claimed]:
            due = connection.execute(
                select(OUTBOX.c.delivery_id, OUTBOX.c.next_attempt_at)
                .where(OUTBOX.c.state == DeliveryState.PENDING.value)
                .where(OUTBOX.c.next_attempt_at <= now)
                # One order for every worker: concurrent claims lock rows in the same
                # order on PostgreSQL, so they wait on each other instead of deadlocking.
                .order_by(OUTBOX.c.next_attempt_at, OUTBOX.c.delivery_id)
                .limit(limit)
            ).all()
            claims = [
                _claim(connection, r.delivery_id, r.next_attempt_at, lease_until, now) for r in due
            ]
            return [c for c in claims if c is not None]

        return run_write(self._engine, work)

    def delivered(self, delivery_id: str, *, now: datetime | None = None) -> bool:
        """Record success. Accepted even after the claim's lease ran out (the receiver
        has it, whoever holds the row now); False if the row was no longer pending."""
        at = now or utcnow()
        statement = (
            update(OUTBOX)
            .where(OUTBOX.c.delivery_id == delivery_id)
            .where(OUTBOX.c.state == DeliveryState.PENDING.value)
            .values(
                state=DeliveryState.DELIVERED.value, last_error=None, updated_at=at, finished_at=at
            )
        )
        return run_write(self._engine, lambda c: c.execute(statement).rowcount == 1)

    def failed(
        self,
        delivery_id: str,
        error: str,
        *,
        max_attempts: int,
        backoff_base_s: float,
        backoff_max_s: float,
        now: datetime | None = None,
        lease_until: datetime | None = None,
    ) -> DeliveryState | None:
        """Record a failed attempt: dead once `max_attempts` attempts were made, else due
        again after a full-jitter backoff. `lease_until` (the claim's): record it only if
        this worker still holds the row, so a late report cannot move a row another
        worker claimed since. The row's new state, or None if nothing was recorded."""
        at = now or utcnow()
        message = _clip(error)

        def work(connection: Connection) -> DeliveryState | None:
            row = connection.execute(
                select(OUTBOX.c.attempts, OUTBOX.c.next_attempt_at)
                .where(OUTBOX.c.delivery_id == delivery_id)
                .where(OUTBOX.c.state == DeliveryState.PENDING.value)
            ).first()
            if row is None or (
                lease_until is not None and not _held(row.next_attempt_at, lease_until)
            ):
                return None
            if row.attempts >= max_attempts:
                values = _dead(message, at)
            else:
                delay = full_jitter_delay(
                    row.attempts, base_s=backoff_base_s, max_s=backoff_max_s, uniform=self._uniform
                )
                values = {"next_attempt_at": at + timedelta(seconds=delay), "last_error": message}
            moved = connection.execute(
                update(OUTBOX)
                .where(OUTBOX.c.delivery_id == delivery_id)
                .where(OUTBOX.c.next_attempt_at == row.next_attempt_at)
                .where(OUTBOX.c.state == DeliveryState.PENDING.value)
                .values(updated_at=at, **values)
            )
            if moved.rowcount != 1:
                return None  # claimed again or settled meanwhile: that report stands
            return DeliveryState(values.get("state", DeliveryState.PENDING.value))

        return run_write(self._engine, work)

    def deliveries(self, request_id: str) -> list[DeliveryRow]:
        """Every sink's delivery of one request (by its ledger key), for `audit show`."""
        query = (
            select(OUTBOX)
            .where(OUTBOX.c.request_id == request_id)
            .order_by(OUTBOX.c.created_at, OUTBOX.c.sink)
        )
        return run_read(self._engine, lambda c: [_delivery(r) for r in c.execute(query)])

    def counts(self) -> dict[DeliveryState, int]:
        """Rows per state (health, metrics)."""
        query = select(OUTBOX.c.state, func.count()).group_by(OUTBOX.c.state)
        rows = run_read(self._engine, lambda c: c.execute(query).all())
        found = {DeliveryState(state): int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in DeliveryState}

    def prune(self, older_than: datetime) -> int:
        """Retention: delete delivered and dead rows finished before `older_than`; the
        number deleted. Pending rows are never pruned."""
        statement = (
            delete(OUTBOX)
            .where(OUTBOX.c.state != DeliveryState.PENDING.value)
            .where(OUTBOX.c.finished_at < older_than)
        )
        return run_write(self._engine, lambda c: int(c.execute(statement).rowcount))


def _pending_count(connection: Connection) -> int:
    query = select(func.count()).where(OUTBOX.c.state == DeliveryState.PENDING.value)
    return int(connection.execute(query).scalar_one())


def _new_row(
    id_: str, sink: str, request_id: str, event: dict[str, Any], at: datetime
) -> dict[str, Any]:
    return {
        "delivery_id": id_,
        "sink": sink,
        "request_id": request_id,
        "event": event,
        "state": DeliveryState.PENDING.value,
        "attempts": 0,
        "next_attempt_at": at,
        "created_at": at,
        "updated_at": at,
    }


def _dead(error: str, at: datetime) -> dict[str, Any]:
    return {"state": DeliveryState.DEAD.value, "last_error": _clip(error), "finished_at": at}


def _clip(error: str) -> str:
    return error if len(error) <= LAST_ERROR_LENGTH else error[:_ERROR_ROOM] + "…"


def _held(next_attempt_at: datetime, lease_until: datetime) -> bool:
    """Whether the row still carries this worker's claim (SQLite hands it back naive)."""
    return as_utc(next_attempt_at) == as_utc(lease_until)


def _claim(
    connection: Connection,
    id_: str,
    due_at: datetime,
    lease_until: datetime,
    now: datetime,
) -> Claimed | None:
    """The conditional UPDATE: it matches only while the row still has the
    `next_attempt_at` this worker read, i.e. nobody claimed it in between. On PostgreSQL
    a concurrent claimer waits for the first one's commit and then matches nothing."""
    row = connection.execute(
        update(OUTBOX)
        .where(OUTBOX.c.delivery_id == id_)
        .where(OUTBOX.c.state == DeliveryState.PENDING.value)
        .where(OUTBOX.c.next_attempt_at == due_at)
        .values(next_attempt_at=lease_until, attempts=OUTBOX.c.attempts + 1, updated_at=now)
        .returning(
            OUTBOX.c.sink,
            OUTBOX.c.request_id,
            OUTBOX.c.event,
            OUTBOX.c.attempts,
            OUTBOX.c.publisher,
        )
    ).first()
    if row is None:
        return None
    return Claimed(
        delivery_id=id_,
        sink=row.sink,
        request_id=row.request_id,
        event=row.event,
        attempt=row.attempts,
        lease_until=lease_until,
        publisher=row.publisher,
    )


def _delivery(row: Row[Any]) -> DeliveryRow:
    return DeliveryRow(
        delivery_id=row.delivery_id,
        sink=row.sink,
        request_id=row.request_id,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        next_attempt_at=as_utc(row.next_attempt_at),
        last_error=row.last_error,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        finished_at=as_utc(row.finished_at) if row.finished_at else None,
        publisher=row.publisher,
    )
