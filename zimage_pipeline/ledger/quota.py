"""Quota ledger: reserve on admission, commit on stored images, release on failure.

Each subject (the user, and every team whose pooled budget the user draws on) has one
counter row per UTC window period with `used`, `reserved` and `granted`. A reservation
locks those rows (one transaction, fixed order), checks
`used + reserved + images <= limit + granted` for each, and adds to `reserved`; commit
moves its images to `used`; release gives them back. Every movement is also an
append-only entry, unique per (request_id, kind), so a redelivered request can neither
reserve, commit nor release twice. See quota_types for the window definitions and txn for
how SQLite and PostgreSQL serialize the writers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Connection, Engine, select, update

from zimage_pipeline.ledger import quota_admin
from zimage_pipeline.ledger.quota_ops import move, reserve_rows, set_state
from zimage_pipeline.ledger.quota_rows import (
    RESERVATIONS,
    CounterKey,
    append_entry,
    get_reservation,
)
from zimage_pipeline.ledger.quota_types import (
    CounterState,
    EntryKind,
    InvalidQuotaOperationError,
    QuotaExceededError,
    QuotaStatus,
    Remaining,
    Reservation,
    ReservationNotFoundError,
    ReservationState,
    Window,
    periods,
    team_subject,
    user_subject,
)
from zimage_pipeline.ledger.txn import DEFAULT_DEADLINE_S, as_utc, run_read, run_write, utcnow
from zimage_pipeline.policy import QuotaLimits, TeamBudget

EXPIRE_BATCH = 500
T = TypeVar("T")


class QuotaLedger:
    def __init__(self, engine: Engine, *, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self._engine = engine
        self._deadline_s = deadline_s

    # -- the request path -----------------------------------------------------------------

    def reserve(
        self,
        *,
        request_id: str,
        user: str,
        teams: Sequence[TeamBudget],
        images: int,
        user_limits: QuotaLimits,
        lease_s: float,
        now: datetime | None = None,
        connection: Connection | None = None,
    ) -> Reservation:
        """Hold `images` against the user's and every team's limits, or raise
        QuotaExceededError naming the first budget that is short. Idempotent per
        request_id: a second call returns the existing reservation, whatever its state.

        With `connection`, it joins the caller's write transaction and does not settle
        lapsed holds itself: on QuotaExceededError the caller may `expire_leases()` and
        try its transaction again."""
        if images < 1 or lease_s <= 0:
            raise InvalidQuotaOperationError("reserve needs images >= 1 and lease_s > 0")
        at = as_utc(now or utcnow())
        planned = {user_subject(user): user_limits}
        for team in teams:
            planned.setdefault(team_subject(team.group), team.limits)

        def work(connection: Connection) -> Reservation:
            return reserve_rows(connection, request_id, planned, images, at, lease_s)

        if connection is not None:
            return work(connection)
        try:
            return run_write(self._engine, work, deadline_s=self._deadline_s)
        except QuotaExceededError:
            # A crashed worker's lapsed hold must not deny a live request: settle, try again.
            if self.expire_leases(now=at) == 0:
                raise
            return run_write(self._engine, work, deadline_s=self._deadline_s)

    def commit(
        self,
        request_id: str,
        images: int,
        *,
        now: datetime | None = None,
        connection: Connection | None = None,
    ) -> Reservation:
        """Charge `images` (<= reserved) as used and give the rest back. Idempotent.

        With `connection`, it joins the caller's open write transaction (to commit the
        charge together with audit events) and the caller commits; otherwise it runs in
        its own, retried transaction."""
        at = as_utc(now or utcnow())

        def work(connection: Connection) -> Reservation:
            current = get_reservation(connection, request_id, for_update=True)
            if current is None:
                raise ReservationNotFoundError(f"no reservation for request {request_id!r}")
            if current.state is ReservationState.COMMITTED:
                return current
            if current.state is ReservationState.RELEASED:
                raise InvalidQuotaOperationError(
                    f"request {request_id!r} released its reservation; it cannot commit"
                )
            if not 0 <= images <= current.images:
                raise InvalidQuotaOperationError(
                    f"commit of {images} images for {request_id!r}, which reserved {current.images}"
                )
            # After the lease ran out the hold is gone, but the images exist: charge them
            # anyway (this can exceed the limit; leases must outlast the slowest job).
            late = current.state is ReservationState.EXPIRED
            held = 0 if late else current.images
            counters = move(connection, current, reserved=-held, used=images)
            set_state(connection, request_id, ReservationState.COMMITTED, at, committed=images)
            append_entry(
                connection,
                request_id=request_id,
                kind=EntryKind.COMMIT,
                subject=current.subjects[0],
                images=images,
                at=at,
                note="after the lease ran out" if late else None,
            )
            return replace(
                current, state=ReservationState.COMMITTED, committed=images, counters=counters
            )

        return self._run(work, connection)

    def release(
        self,
        request_id: str,
        reason: str,
        *,
        now: datetime | None = None,
        connection: Connection | None = None,
    ) -> Reservation | None:
        """Give a reservation's images back. Idempotent; None if there was none.
        `connection`: as for commit()."""
        at = as_utc(now or utcnow())
        return self._release(request_id, reason, at, expired_only=False, connection=connection)

    def extend_lease(
        self,
        request_id: str,
        lease_s: float,
        *,
        now: datetime | None = None,
        connection: Connection | None = None,
    ) -> Reservation | None:
        """Push a live reservation's lease out (a long job's heartbeat). `connection`:
        as for commit()."""
        at = as_utc(now or utcnow())

        def work(connection: Connection) -> Reservation | None:
            connection.execute(
                update(RESERVATIONS)
                .where(RESERVATIONS.c.request_id == request_id)
                .where(RESERVATIONS.c.state == ReservationState.RESERVED.value)
                .values(lease_expires_at=at + timedelta(seconds=lease_s), updated_at=at)
            )
            return get_reservation(connection, request_id)

        return self._run(work, connection)

    def expire_leases(self, now: datetime | None = None) -> int:
        """Release every reservation whose lease ran out; returns how many."""
        at = as_utc(now or utcnow())
        due = select(RESERVATIONS.c.request_id).where(
            RESERVATIONS.c.state == ReservationState.RESERVED.value,
            RESERVATIONS.c.lease_expires_at <= at,
        )
        request_ids = run_read(
            self._engine, lambda c: list(c.execute(due.limit(EXPIRE_BATCH)).scalars())
        )
        expired = 0
        for request_id in request_ids:
            result = self._release(request_id, "LEASE_EXPIRED", at, expired_only=True)
            expired += result is not None and result.state is ReservationState.EXPIRED
        return expired

    def remaining(
        self,
        *,
        user: str,
        teams: Sequence[TeamBudget],
        user_limits: QuotaLimits,
        now: datetime | None = None,
        connection: Connection | None = None,
        known: Mapping[CounterKey, CounterState] | None = None,
    ) -> Remaining:
        """The images a next request could still reserve: the tightest of all budgets.
        `connection`: read inside the caller's transaction (what it has just written).
        `known`: counter rows the caller holds locked (a commit's `counters`); a budget
        whose current day and month rows are all there is not read again."""
        at = now or utcnow()
        budgets = [(user_subject(user), user_limits)]
        budgets += [(team_subject(t.group), t.limits) for t in teams]
        per = periods(at)
        statuses: list[QuotaStatus | None] = [
            quota_admin.status_from(subject, limits, per, known or {})
            for subject, limits in budgets
        ]

        def read(c: Connection) -> list[QuotaStatus | None]:
            return [quota_admin.usage(c, subject, limits, at) for subject, limits in budgets]

        if None in statuses:
            statuses = read(connection) if connection is not None else run_read(self._engine, read)

        def tightest(window: Window) -> int | None:
            values = [s.window(window).remaining for s in statuses if s is not None]
            present = [v for v in values if v is not None]
            return min(present) if present else None

        return Remaining(day=tightest(Window.DAY), month=tightest(Window.MONTH))

    # -- administration ---------------------------------------------------------------------

    def usage(
        self, subject: str, *, limits: QuotaLimits | None = None, now: datetime | None = None
    ) -> QuotaStatus:
        """Used, reserved, granted, limit and remaining of the current day and month."""
        return run_read(
            self._engine,
            lambda c: quota_admin.usage(c, subject, limits or QuotaLimits(), now or utcnow()),
        )

    def set_limit(
        self,
        subject: str,
        *,
        images_per_day: int | None,
        images_per_month: int | None,
        actor: str,
        note: str | None = None,
        change_id: str | None = None,
        connection: Connection | None = None,
    ) -> None:
        """Override the policy's limits of a subject; None for both removes the override.
        `change_id`: the entry's id (default `admin:<uuid>`); `connection`: join the
        caller's write transaction."""
        self._run(
            lambda c: quota_admin.set_limit(
                c,
                subject,
                images_per_day,
                images_per_month,
                actor=actor,
                note=note,
                change_id=change_id,
            ),
            connection,
        )

    def grant(
        self,
        subject: str,
        images: int,
        *,
        window: Window,
        actor: str,
        note: str | None = None,
        grant_id: str | None = None,
        now: datetime | None = None,
        connection: Connection | None = None,
    ) -> bool:
        """A one-off top-up of the current period of `window`; recorded as an entry
        (`grant:<grant_id>`). With a `grant_id`, repeating the same grant is a no-op
        (returns False). `connection`: join the caller's write transaction."""
        at = as_utc(now or utcnow())
        return self._run(
            lambda c: quota_admin.grant(
                c, subject, images, window, at, actor=actor, note=note, grant_id=grant_id
            ),
            connection,
        )

    # -- internals --------------------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T], connection: Connection | None) -> T:
        if connection is not None:
            return work(connection)
        return run_write(self._engine, work, deadline_s=self._deadline_s)

    def _release(
        self,
        request_id: str,
        reason: str,
        at: datetime,
        *,
        expired_only: bool,
        connection: Connection | None = None,
    ) -> Reservation | None:
        def work(connection: Connection) -> Reservation | None:
            current = get_reservation(connection, request_id, for_update=True)
            if current is None or current.state is not ReservationState.RESERVED:
                return current
            if expired_only and current.lease_expires_at > at:
                return current  # extended meanwhile
            state = ReservationState.EXPIRED if expired_only else ReservationState.RELEASED
            move(connection, current, reserved=-current.images, used=0)
            set_state(connection, request_id, state, at)
            append_entry(
                connection,
                request_id=request_id,
                kind=EntryKind.RELEASE,
                subject=current.subjects[0],
                images=current.images,
                at=at,
                note=reason,
            )
            return replace(current, state=state)

        return self._run(work, connection)
