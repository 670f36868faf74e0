"""The transactional steps of the quota ledger (run inside txn.run_write)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, select, update

from zimage_pipeline.ledger.quota_rows import (
    COUNTERS,
    RESERVATIONS,
    append_entry,
    counter_keys,
    effective_limits,
    get_reservation,
    limit_overrides,
    lock_counters,
    to_reservation,
)
from zimage_pipeline.ledger.quota_types import (
    EntryKind,
    QuotaExceededError,
    Reservation,
    ReservationState,
    Window,
    periods,
)
from zimage_pipeline.policy import QuotaLimits


def reserve_rows(
    connection: Connection,
    request_id: str,
    planned: dict[str, QuotaLimits],
    images: int,
    at: datetime,
    lease_s: float,
) -> Reservation:
    existing = get_reservation(connection, request_id)
    if existing is not None:
        return existing
    per = periods(at)
    day, month = per[Window.DAY], per[Window.MONTH]
    limits = effective_limits(planned, limit_overrides(connection, planned))
    rows = lock_counters(connection, counter_keys(planned, day, month))
    # Under the locks: a concurrent redelivery of this request may have committed first.
    existing = get_reservation(connection, request_id)
    if existing is not None:
        return existing
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
    connection.execute(
        update(COUNTERS)
        .where(COUNTERS.c.id.in_([r.id for r in rows.values()]))
        .values(reserved=COUNTERS.c.reserved + images)
    )
    subjects = list(planned)
    lease_expires_at = at + timedelta(seconds=lease_s)
    connection.execute(
        RESERVATIONS.insert().values(
            request_id=request_id,
            subjects=subjects,
            day=day,
            month=month,
            images=images,
            state=ReservationState.RESERVED.value,
            lease_expires_at=lease_expires_at,
            created_at=at,
            updated_at=at,
        )
    )
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


def move(connection: Connection, reservation: Reservation, *, reserved: int, used: int) -> None:
    rows = lock_counters(
        connection, counter_keys(reservation.subjects, reservation.day, reservation.month)
    )
    connection.execute(
        update(COUNTERS)
        .where(COUNTERS.c.id.in_([r.id for r in rows.values()]))
        .values(reserved=COUNTERS.c.reserved + reserved, used=COUNTERS.c.used + used)
    )


def set_state(
    connection: Connection,
    request_id: str,
    state: ReservationState,
    at: datetime,
    *,
    committed: int | None = None,
) -> None:
    values: dict[str, object] = {"state": state.value, "updated_at": at}
    if committed is not None:
        values["committed"] = committed
    connection.execute(
        update(RESERVATIONS).where(RESERVATIONS.c.request_id == request_id).values(**values)
    )


def reload(connection: Connection, request_id: str) -> Reservation:
    row = connection.execute(
        select(RESERVATIONS).where(RESERVATIONS.c.request_id == request_id)
    ).one()
    return to_reservation(row)
