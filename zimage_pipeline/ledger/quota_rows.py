"""Row-level helpers of the quota ledger (SQLAlchemy Core, one Connection, no commit)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Row, Select, Table, bindparam, insert, select, tuple_

from zimage_pipeline.ledger.models import QuotaCounter, QuotaEntry, QuotaLimit, QuotaReservation
from zimage_pipeline.ledger.quota_types import (
    EntryKind,
    Reservation,
    ReservationState,
    Window,
)
from zimage_pipeline.ledger.txn import as_utc, upsert_insert
from zimage_pipeline.policy import QuotaLimits

COUNTERS = cast(Table, QuotaCounter.__table__)
RESERVATIONS = cast(Table, QuotaReservation.__table__)
ENTRIES = cast(Table, QuotaEntry.__table__)
LIMITS = cast(Table, QuotaLimit.__table__)

CounterKey = tuple[str, str, str]  # (subject, window, period)
Override = tuple[int | None, int | None]  # (images_per_day, images_per_month); None: policy


def counter_keys(subjects: Iterable[str], day: str, month: str) -> list[CounterKey]:
    """Sorted: every transaction locks counter rows in this one order (no deadlocks)."""
    keys = {(s, Window.DAY.value, day) for s in subjects}
    keys |= {(s, Window.MONTH.value, month) for s in subjects}
    return sorted(keys)


def lock_counters(connection: Connection, keys: Sequence[CounterKey]) -> dict[CounterKey, Row[Any]]:
    """The counter rows of `keys`, created at zero if missing, locked until commit.

    Each row also carries its subject's administrator override (`override_day`,
    `override_month`, `has_override`), read in the same round trip. PostgreSQL:
    SELECT ... ORDER BY ... FOR UPDATE OF the counters locks them in key order. SQLite: the
    transaction already holds the database write lock (BEGIN IMMEDIATE).
    """
    columns = (COUNTERS.c.subject, COUNTERS.c.window_kind, COUNTERS.c.period)
    query = _counters_of(connection.dialect.name)
    params = {"keys": list(keys)}
    rows = {(r.subject, r.window_kind, r.period): r for r in connection.execute(query, params)}
    missing = [k for k in keys if k not in rows]
    if missing:
        connection.execute(
            upsert_insert(connection, COUNTERS)
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
        rows = {(r.subject, r.window_kind, r.period): r for r in connection.execute(query, params)}
    return rows


# The statements every request runs are built once (per dialect where they differ):
# building one costs more Python time than its round trip. Values come as parameters.
@functools.cache
def _counters_of(dialect: str) -> Select[Any]:
    columns = (COUNTERS.c.subject, COUNTERS.c.window_kind, COUNTERS.c.period)
    query = (
        select(
            COUNTERS,
            LIMITS.c.images_per_day.label("override_day"),
            LIMITS.c.images_per_month.label("override_month"),
            LIMITS.c.id.is_not(None).label("has_override"),
        )
        .select_from(COUNTERS.outerjoin(LIMITS, LIMITS.c.subject == COUNTERS.c.subject))
        .where(tuple_(*columns).in_(bindparam("keys", expanding=True)))
        .order_by(*columns)
    )
    return query if dialect == "sqlite" else query.with_for_update(of=COUNTERS)


@functools.cache
def _reservation_of(dialect: str, for_update: bool) -> Select[Any]:
    query = select(RESERVATIONS).where(RESERVATIONS.c.request_id == bindparam("rid"))
    return query.with_for_update() if for_update and dialect != "sqlite" else query


_INSERT_ENTRY = insert(ENTRIES)


def overrides_of(rows: Iterable[Row[Any]]) -> dict[str, Override]:
    return {r.subject: (r.override_day, r.override_month) for r in rows if r.has_override}


def get_reservation(
    connection: Connection, request_id: str, *, for_update: bool = False
) -> Reservation | None:
    query = _reservation_of(connection.dialect.name, for_update)
    row = connection.execute(query, {"rid": request_id}).first()
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


def limit_overrides(connection: Connection, subjects: Iterable[str]) -> dict[str, Override]:
    query = select(LIMITS).where(LIMITS.c.subject.in_(list(subjects)))
    return {r.subject: (r.images_per_day, r.images_per_month) for r in connection.execute(query)}


def effective_limits(
    planned: Mapping[str, QuotaLimits], overrides: Mapping[str, Override]
) -> dict[str, QuotaLimits]:
    """An administrator's `quota set` overrides the policy, window by window."""
    out = {}
    for subject, limits in planned.items():
        day, month = limits.images_per_day, limits.images_per_month
        override_day, override_month = overrides.get(subject, (None, None))
        out[subject] = QuotaLimits(
            override_day if override_day is not None else day,
            override_month if override_month is not None else month,
        )
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
        _INSERT_ENTRY,
        {
            "request_id": request_id,
            "kind": kind.value,
            "subject": subject,
            "images": images,
            "actor": actor,
            "note": note[:512] if note else note,
            "details": details,
            "created_at": at,
        },
    )
