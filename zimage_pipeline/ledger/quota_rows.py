"""Row-level helpers of the quota ledger (SQLAlchemy Core, one Connection, no commit)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, insert, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from zimage_pipeline.ledger.models import QuotaCounter, QuotaEntry, QuotaLimit, QuotaReservation
from zimage_pipeline.ledger.quota_types import (
    EntryKind,
    Reservation,
    ReservationState,
    Window,
)
from zimage_pipeline.ledger.txn import as_utc, is_sqlite
from zimage_pipeline.policy import QuotaLimits

COUNTERS = cast(Table, QuotaCounter.__table__)
RESERVATIONS = cast(Table, QuotaReservation.__table__)
ENTRIES = cast(Table, QuotaEntry.__table__)
LIMITS = cast(Table, QuotaLimit.__table__)

CounterKey = tuple[str, str, str]  # (subject, window, period)


def counter_keys(subjects: Iterable[str], day: str, month: str) -> list[CounterKey]:
    """Sorted: every transaction locks counter rows in this one order (no deadlocks)."""
    keys = {(s, Window.DAY.value, day) for s in subjects}
    keys |= {(s, Window.MONTH.value, month) for s in subjects}
    return sorted(keys)


def lock_counters(connection: Connection, keys: Sequence[CounterKey]) -> dict[CounterKey, Row[Any]]:
    """The counter rows of `keys`, created at zero if missing, locked until commit.

    PostgreSQL: SELECT ... ORDER BY ... FOR UPDATE locks them in key order. SQLite: the
    transaction already holds the database write lock (BEGIN IMMEDIATE).
    """
    columns = (COUNTERS.c.subject, COUNTERS.c.window_kind, COUNTERS.c.period)
    query = select(COUNTERS).where(tuple_(*columns).in_(list(keys))).order_by(*columns)
    if not is_sqlite(connection):
        query = query.with_for_update()
    rows = {(r.subject, r.window_kind, r.period): r for r in connection.execute(query)}
    missing = [k for k in keys if k not in rows]
    if missing:
        dialect_insert = sqlite_insert if is_sqlite(connection) else pg_insert
        connection.execute(
            dialect_insert(COUNTERS)
            .values(
                [
                    {
                        "subject": s,
                        "window_kind": w,
                        "period": p,
                        "used": 0,
                        "reserved": 0,
                        "granted": 0,
                    }
                    for s, w, p in missing
                ]
            )
            .on_conflict_do_nothing(index_elements=list(columns))
        )
        rows = {(r.subject, r.window_kind, r.period): r for r in connection.execute(query)}
    return rows


def get_reservation(
    connection: Connection, request_id: str, *, for_update: bool = False
) -> Reservation | None:
    query = select(RESERVATIONS).where(RESERVATIONS.c.request_id == request_id)
    if for_update and not is_sqlite(connection):
        query = query.with_for_update()
    row = connection.execute(query).first()
    return None if row is None else to_reservation(row)


def to_reservation(row: Row[Any], *, created: bool = False) -> Reservation:
    return Reservation(
        request_id=row.request_id,
        subjects=tuple(row.subjects),
        images=row.images,
        state=ReservationState(row.state),
        day=row.day,
        month=row.month,
        lease_expires_at=as_utc(row.lease_expires_at),
        committed=row.committed,
        created=created,
    )


def limit_overrides(connection: Connection, subjects: Iterable[str]) -> dict[str, Row[Any]]:
    query = select(LIMITS).where(LIMITS.c.subject.in_(list(subjects)))
    return {row.subject: row for row in connection.execute(query)}


def effective_limits(
    planned: Mapping[str, QuotaLimits], overrides: Mapping[str, Row[Any]]
) -> dict[str, QuotaLimits]:
    """An administrator's `quota set` overrides the policy, window by window."""
    out = {}
    for subject, limits in planned.items():
        row = overrides.get(subject)
        day, month = limits.images_per_day, limits.images_per_month
        if row is not None:
            day = row.images_per_day if row.images_per_day is not None else day
            month = row.images_per_month if row.images_per_month is not None else month
        out[subject] = QuotaLimits(day, month)
    return out


def append_entry(
    connection: Connection,
    *,
    request_id: str,
    kind: EntryKind,
    subject: str,
    images: int,
    at: datetime,
    actor: str | None = None,
    note: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    connection.execute(
        insert(ENTRIES).values(
            request_id=request_id,
            kind=kind.value,
            subject=subject,
            images=images,
            actor=actor,
            note=note[:512] if note else note,
            details=details,
            created_at=at,
        )
    )
