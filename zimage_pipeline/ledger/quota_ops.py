"""The transactional steps of the quota ledger (run inside txn.run_write)."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta

from sqlalchemy import Connection, Executable, bindparam, update

from zimage_pipeline.ledger.quota_rows import (
    COUNTERS,
    RESERVATIONS,
    CounterKey,
    append_entry,
    counter_keys,
    effective_limits,
    get_reservation,
    lock_counters,
    overrides_of,
)
from zimage_pipeline.ledger.quota_types import (
    CounterState,
    EntryKind,
    QuotaExceededError,
    Reservation,
    ReservationState,
    Window,
    periods,
)
from zimage_pipeline.ledger.txn import dialect_insert
from zimage_pipeline.policy import QuotaLimits


def reserve_rows(
    connection: Connection,
    request_id: str,
    planned: dict[str, QuotaLimits],
    images: int,
    at: datetime,
    lease_s: float,
) -> Reservation:
    per = periods(at)
    day, month = per[Window.DAY], per[Window.MONTH]
    rows = lock_counters(connection, counter_keys(planned, day, month))
    subjects = list(planned)
    lease_expires_at = at + timedelta(seconds=lease_s)
    # The reservation row goes in first, under the counter locks: its unique request_id
    # is the idempotency check (a redelivery finds its own reservation and charges
    # nothing). A refusal below rolls the whole transaction back, this row included.
    inserted = connection.execute(
        _insert_reservation(connection.dialect.name),
        {
            "request_id": request_id,
            "subjects": subjects,
            "day": day,
            "month": month,
            "images": images,
            "state": ReservationState.RESERVED.value,
            "lease_expires_at": lease_expires_at,
            "created_at": at,
            "updated_at": at,
        },
    ).first()
    if inserted is None:
        existing = get_reservation(connection, request_id)
        assert existing is not None  # the conflict was on request_id
        return existing
    limits = effective_limits(planned, overrides_of(rows.values()))
    for subject, subject_limits in limits.items():  # the user first: the clearest message
        for window, period, limit in (
            (Window.DAY, day, subject_limits.images_per_day),
            (Window.MONTH, month, subject_limits.images_per_month),
        ):
            row = rows[(subject, window.value, period)]
            left = limit + row.granted - row.used - row.reserved if limit is not None else None
            if left is not None and images > left:
                raise QuotaExceededError(
                    f"{window.value} quota of {subject} ({period}) exhausted: "
                    f"{max(0, left)} of {limit + row.granted} images left, {images} requested",
                    subject=subject,
                    window=window,
                    remaining=max(0, left),
                )
    ids = [r.id for r in rows.values()]
    connection.execute(_ADD_TO_COUNTERS, {"ids": ids, "d_reserved": images, "d_used": 0})
    append_entry(
        connection,
        request_id=request_id,
        kind=EntryKind.RESERVE,
        subject=subjects[0],
        images=images,
        at=at,
        details={"subjects": subjects, "day": day, "month": month},
    )
    return Reservation(
        request_id=request_id,
        subjects=tuple(subjects),
        images=images,
        state=ReservationState.RESERVED,
        day=day,
        month=month,
        lease_expires_at=lease_expires_at,
        created=True,
    )


def move(
    connection: Connection, reservation: Reservation, *, reserved: int, used: int
) -> dict[CounterKey, CounterState]:
    """Add to the reservation's counters; returns them as they stand after the move."""
    rows = lock_counters(
        connection, counter_keys(reservation.subjects, reservation.day, reservation.month)
    )
    ids = [r.id for r in rows.values()]
    connection.execute(_ADD_TO_COUNTERS, {"ids": ids, "d_reserved": reserved, "d_used": used})
    overrides = overrides_of(rows.values())
    return {
        key: CounterState(
            used=row.used + used,
            reserved=row.reserved + reserved,
            granted=row.granted,
            override=overrides.get(row.subject),
        )
        for key, row in rows.items()
    }


def set_state(
    connection: Connection,
    request_id: str,
    state: ReservationState,
    at: datetime,
    *,
    committed: int | None = None,
) -> None:
    values: dict[str, object] = {"rid": request_id, "state": state.value, "updated_at": at}
    if committed is not None:
        values["committed"] = committed
    connection.execute(_SET_RESERVATION, values)


# The statements every request runs, built once: building one costs more Python time
# than its round trip. Values come as parameters (an UPDATE sets the columns they name).
_ADD_TO_COUNTERS = (
    update(COUNTERS)
    .where(COUNTERS.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        reserved=COUNTERS.c.reserved + bindparam("d_reserved"),
        used=COUNTERS.c.used + bindparam("d_used"),
    )
)
_SET_RESERVATION = update(RESERVATIONS).where(RESERVATIONS.c.request_id == bindparam("rid"))


@functools.cache
def _insert_reservation(dialect: str) -> Executable:
    insert = dialect_insert(dialect, RESERVATIONS)
    return insert.on_conflict_do_nothing(index_elements=[RESERVATIONS.c.request_id]).returning(
        RESERVATIONS.c.id
    )
