"""Quota vocabulary: subjects, UTC windows, results and errors.

Windows. A day is the UTC calendar day [00:00, 24:00) and a month the UTC calendar month;
their periods are named "YYYY-MM-DD" and "YYYY-MM". A reservation belongs to the windows
of the instant it was made, and its commit or release settles those same windows even
when it happens after midnight, so every window adds up on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from zimage_pipeline.directory.filters import normalize_dn
from zimage_pipeline.errors import Disposition, ZImageError
from zimage_pipeline.ledger.txn import as_utc


class Window(StrEnum):
    DAY = "day"
    MONTH = "month"


class ReservationState(StrEnum):
    RESERVED = "reserved"  # holds images against the limits until committed or released
    COMMITTED = "committed"  # the images were stored: charged as used
    RELEASED = "released"  # failed, rejected or cancelled: nothing charged
    EXPIRED = "expired"  # the lease ran out (crashed worker): released by expire_leases


class EntryKind(StrEnum):
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    GRANT = "grant"
    SET_LIMIT = "set_limit"


USER_PREFIX = "user:"
TEAM_PREFIX = "team:"


def user_subject(username: str) -> str:
    return USER_PREFIX + username


def team_subject(group_dn: str) -> str:
    """Teams are keyed by the normalized DN, so a re-spelled policy keeps its counters."""
    return TEAM_PREFIX + normalize_dn(group_dn)


def periods(at: datetime) -> dict[Window, str]:
    at = as_utc(at)
    return {Window.DAY: at.strftime("%Y-%m-%d"), Window.MONTH: at.strftime("%Y-%m")}


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    subjects: tuple[str, ...]  # the user first, then each team charged
    images: int
    state: ReservationState
    day: str
    month: str
    lease_expires_at: datetime
    committed: int | None = None
    created: bool = False  # True only for the call that made it (not a redelivery)
    # The counter rows this call moved, as they stand after it (locked until the
    # transaction ends, so still true at commit): what is left can be told from them
    # without reading them again. Empty when the call moved nothing.
    counters: Mapping[tuple[str, str, str], CounterState] = field(
        default_factory=dict, compare=False
    )


@dataclass(frozen=True, slots=True)
class CounterState:
    """One (subject, window, period) counter row, and its subject's override if any."""

    used: int
    reserved: int
    granted: int
    override: tuple[int | None, int | None] | None  # (per day, per month); None: policy


@dataclass(frozen=True, slots=True)
class WindowUsage:
    window: Window
    period: str
    used: int
    reserved: int
    granted: int  # one-off top-ups in this period, added to the limit
    limit: int | None  # the base limit (override or policy); None: no cap

    @property
    def remaining(self) -> int | None:
        if self.limit is None:
            return None
        return max(0, self.limit + self.granted - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    subject: str
    windows: tuple[WindowUsage, ...]

    def window(self, window: Window) -> WindowUsage:
        return next(w for w in self.windows if w.window is window)


@dataclass(frozen=True, slots=True)
class Remaining:
    """What a request could still use: the tightest budget among all subjects."""

    day: int | None
    month: int | None


class QuotaExceededError(ZImageError):
    disposition = Disposition.REJECT
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, subject: str, window: Window, remaining: int) -> None:
        super().__init__(message)
        self.subject = subject
        self.window = window
        self.remaining = remaining


class ReservationNotFoundError(ZImageError):
    """commit() for a request that never reserved: a bug in the caller, not retryable."""

    disposition = Disposition.FAIL
    reason = "NO_RESERVATION"


class InvalidQuotaOperationError(ZImageError):
    disposition = Disposition.FAIL
    reason = "INVALID_QUOTA_OPERATION"
