"""Administrative side of the quota ledger: usage reports, limit overrides, top-ups.

Every change made here is also an append-only entry naming its actor, so `quota set` and
`quota grant` are audited in the same place as the request movements.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select, update

from zimage_pipeline.ledger.quota_rows import (
    COUNTERS,
    ENTRIES,
    LIMITS,
    CounterKey,
    Override,
    append_entry,
    counter_keys,
    effective_limits,
    limit_overrides,
    lock_counters,
)
from zimage_pipeline.ledger.quota_types import (
    CounterState,
    EntryKind,
    InvalidQuotaOperationError,
    QuotaStatus,
    Window,
    WindowUsage,
    periods,
)
from zimage_pipeline.ledger.txn import as_utc, upsert_insert, utcnow
from zimage_pipeline.policy import QuotaLimits


def usage(connection: Connection, subject: str, limits: QuotaLimits, now: datetime) -> QuotaStatus:
    per = periods(now)
    overrides = limit_overrides(connection, [subject])
    query = select(COUNTERS).where(
        COUNTERS.c.subject == subject,
        ((COUNTERS.c.window_kind == Window.DAY.value) & (COUNTERS.c.period == per[Window.DAY]))
        | (
            (COUNTERS.c.window_kind == Window.MONTH.value)
            & (COUNTERS.c.period == per[Window.MONTH])
        ),
    )
    rows = {r.window_kind: r for r in connection.execute(query)}
    return _status(
        subject,
        limits,
        overrides.get(subject),
        per,
        rows.get(Window.DAY.value),
        rows.get(Window.MONTH.value),
    )


def status_from(
    subject: str,
    limits: QuotaLimits,
    per: Mapping[Window, str],
    counters: Mapping[CounterKey, CounterState],
) -> QuotaStatus | None:
    """`usage` without a read, from counter rows the caller holds (locked): None unless
    both of the subject's current rows (day and month of `per`) are there."""
    day = counters.get((subject, Window.DAY.value, per[Window.DAY]))
    month = counters.get((subject, Window.MONTH.value, per[Window.MONTH]))
    if day is None or month is None:
        return None
    return _status(subject, limits, day.override, per, day, month)


def _status(
    subject: str,
    limits: QuotaLimits,
    override: Override | None,
    per: Mapping[Window, str],
    day: Any,
    month: Any,
) -> QuotaStatus:
    """A subject's usage from its day and month counters (rows or CounterStates with
    used/reserved/granted; None: nothing counted yet) and its override, if any."""
    effective = effective_limits({subject: limits}, {subject: override} if override else {})
    windows = tuple(
        WindowUsage(
            window=window,
            period=per[window],
            used=row.used if row else 0,
            reserved=row.reserved if row else 0,
            granted=row.granted if row else 0,
            limit=limit,
        )
        for window, row, limit in (
            (Window.DAY, day, effective[subject].images_per_day),
            (Window.MONTH, month, effective[subject].images_per_month),
        )
    )
    return QuotaStatus(subject=subject, windows=windows)


def set_limit(
    connection: Connection,
    subject: str,
    images_per_day: int | None,
    images_per_month: int | None,
    *,
    actor: str,
    note: str | None,
    change_id: str | None = None,
) -> None:
    for value in (images_per_day, images_per_month):
        if value is not None and value < 0:
            raise InvalidQuotaOperationError("a limit cannot be negative")
    at = utcnow()
    if images_per_day is None and images_per_month is None:
        connection.execute(delete(LIMITS).where(LIMITS.c.subject == subject))
    else:
        values = {
            "subject": subject,
            "images_per_day": images_per_day,
            "images_per_month": images_per_month,
            "updated_by": actor,
            "updated_at": at,
        }
        statement = upsert_insert(connection, LIMITS).values(**values)
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[LIMITS.c.subject],
                set_={k: v for k, v in values.items() if k != "subject"},
            )
        )
    append_entry(
        connection,
        request_id=change_id or f"admin:{uuid.uuid4().hex}",
        kind=EntryKind.SET_LIMIT,
        subject=subject,
        images=0,
        at=at,
        actor=actor,
        note=note,
        details={"images_per_day": images_per_day, "images_per_month": images_per_month},
    )


def grant(
    connection: Connection,
    subject: str,
    images: int,
    window: Window,
    at: datetime,
    *,
    actor: str,
    note: str | None,
    grant_id: str | None,
) -> bool:
    if images < 1:
        raise InvalidQuotaOperationError("a grant must add at least one image")
    request_id = f"grant:{grant_id or uuid.uuid4().hex}"
    already = connection.execute(
        select(ENTRIES.c.id).where(
            ENTRIES.c.request_id == request_id, ENTRIES.c.kind == EntryKind.GRANT.value
        )
    ).first()
    if already is not None:
        return False
    at = as_utc(at)
    per = periods(at)
    keys = [
        k
        for k in counter_keys([subject], per[Window.DAY], per[Window.MONTH])
        if k[1] == window.value
    ]
    rows = lock_counters(connection, keys)
    connection.execute(
        update(COUNTERS)
        .where(COUNTERS.c.id.in_([r.id for r in rows.values()]))
        .values(granted=COUNTERS.c.granted + images)
    )
    append_entry(
        connection,
        request_id=request_id,
        kind=EntryKind.GRANT,
        subject=subject,
        images=images,
        at=at,
        actor=actor,
        note=note,
        details={"window": window.value, "period": per[window]},
    )
    return True
