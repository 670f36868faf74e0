"""Quota ledger on SQLite and PostgreSQL: reserve, commit, release, leases, windows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import IntegrityError

from tests.integration.quota_support import counter, entry_kinds, migrated_engine
from zimage_pipeline.errors import Disposition
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_rows import ENTRIES, CounterKey
from zimage_pipeline.ledger.quota_types import (
    CounterState,
    InvalidQuotaOperationError,
    QuotaExceededError,
    Remaining,
    ReservationNotFoundError,
    ReservationState,
    Window,
    team_subject,
)
from zimage_pipeline.ledger.txn import run_write
from zimage_pipeline.policy import QuotaLimits, TeamBudget

pytestmark = pytest.mark.integration

NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
DESIGN = "cn=design-team,ou=groups,dc=example,dc=org"
TEAM = team_subject(DESIGN)
LIMITS = QuotaLimits(images_per_day=5, images_per_month=8)


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    with migrated_engine(ledger_url) as engine:
        yield engine


@pytest.fixture
def ledger(engine: Engine) -> QuotaLedger:
    return QuotaLedger(engine)


def reserve(ledger: QuotaLedger, request_id: str, images: int = 1, **kw: object) -> object:
    args: dict[str, object] = {
        "request_id": request_id,
        "user": "alice",
        "teams": (),
        "images": images,
        "user_limits": LIMITS,
        "lease_s": 600,
        "now": NOON,
    }
    args.update(kw)
    return ledger.reserve(**args)  # type: ignore[arg-type]


def test_reserve_is_idempotent_per_request(ledger: QuotaLedger, engine: Engine) -> None:
    first = ledger.reserve(
        request_id="r1", user="alice", teams=(), images=2, user_limits=LIMITS, lease_s=60, now=NOON
    )
    again = ledger.reserve(
        request_id="r1", user="alice", teams=(), images=2, user_limits=LIMITS, lease_s=60, now=NOON
    )
    assert first.created and not again.created
    assert again.state is ReservationState.RESERVED
    assert counter(engine, "user:alice", "day") == (0, 2, 0)
    assert entry_kinds(engine) == {"reserve": 1}


def test_exceeding_names_the_budget_and_charges_nothing(
    ledger: QuotaLedger, engine: Engine
) -> None:
    reserve(ledger, "r1", 4)
    with pytest.raises(QuotaExceededError) as denied:
        reserve(ledger, "r2", 2)
    error = denied.value
    assert (error.disposition, error.reason) == (Disposition.REJECT, "QUOTA_EXCEEDED")
    assert (error.subject, error.window, error.remaining) == ("user:alice", Window.DAY, 1)
    assert "day quota of user:alice" in str(error) and "1 of 5 images left" in str(error)
    assert counter(engine, "user:alice", "day") == (0, 4, 0)
    reserve(ledger, "r3", 1)  # exactly the rest still fits


def test_team_budgets_pool_across_users(ledger: QuotaLedger) -> None:
    team = (TeamBudget(DESIGN, images_per_day=3),)
    reserve(ledger, "a1", 2, user="alice", teams=team)
    with pytest.raises(QuotaExceededError) as denied:
        reserve(ledger, "b1", 2, user="bob", teams=team)
    assert denied.value.subject == TEAM
    reserve(ledger, "b2", 1, user="bob", teams=team)
    left = ledger.remaining(user="bob", teams=team, user_limits=LIMITS, now=NOON)
    assert (left.day, left.month) == (0, 7)


def test_commit_charges_and_returns_the_rest_once(ledger: QuotaLedger, engine: Engine) -> None:
    reserve(ledger, "r1", 3)
    committed = ledger.commit("r1", 2, now=NOON)
    assert (committed.state, committed.committed) == (ReservationState.COMMITTED, 2)
    ledger.commit("r1", 2, now=NOON)  # redelivered: no second charge
    assert counter(engine, "user:alice", "day") == (2, 0, 0)
    assert counter(engine, "user:alice", "month") == (2, 0, 0)
    assert entry_kinds(engine) == {"reserve": 1, "commit": 1}
    with pytest.raises(ReservationNotFoundError):
        ledger.commit("never-reserved", 1)
    reserve(ledger, "r2", 1)
    with pytest.raises(InvalidQuotaOperationError):
        ledger.commit("r2", 2)


def test_release_is_idempotent_and_final(ledger: QuotaLedger, engine: Engine) -> None:
    reserve(ledger, "r1", 3)
    assert ledger.release("r1", "ENGINE_FAILED", now=NOON).state is ReservationState.RELEASED  # type: ignore[union-attr]
    ledger.release("r1", "ENGINE_FAILED", now=NOON)
    assert ledger.release("unknown", "X") is None
    assert counter(engine, "user:alice", "day") == (0, 0, 0)
    assert entry_kinds(engine) == {"reserve": 1, "release": 1}
    with pytest.raises(InvalidQuotaOperationError):
        ledger.commit("r1", 1)


def test_entries_are_unique_per_request_and_kind(engine: Engine) -> None:
    row = {"request_id": "r1", "kind": "commit", "subject": "user:alice", "images": 1}
    with engine.begin() as connection:
        connection.execute(insert(ENTRIES).values(**row))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(ENTRIES).values(**row))


def test_lapsed_leases_are_released(ledger: QuotaLedger, engine: Engine) -> None:
    reserve(ledger, "crashed", 5, lease_s=30)
    assert ledger.expire_leases(now=NOON + timedelta(seconds=29)) == 0
    assert ledger.expire_leases(now=NOON + timedelta(seconds=31)) == 1
    assert ledger.expire_leases(now=NOON + timedelta(seconds=32)) == 0
    assert counter(engine, "user:alice", "day") == (0, 0, 0)
    # A late commit (the worker was alive after all) still charges what it stored.
    assert ledger.commit("crashed", 5, now=NOON + timedelta(seconds=40)).committed == 5
    assert counter(engine, "user:alice", "day") == (5, 0, 0)


def test_a_denied_reserve_first_settles_lapsed_leases(ledger: QuotaLedger) -> None:
    reserve(ledger, "crashed", 5, lease_s=30)
    later = NOON + timedelta(minutes=5)
    assert reserve(ledger, "next", 5, now=later).created  # type: ignore[attr-defined]
    assert ledger.extend_lease("next", 600, now=later) is not None


def test_extended_leases_survive_expiry(ledger: QuotaLedger) -> None:
    reserve(ledger, "long-job", 1, lease_s=30)
    ledger.extend_lease("long-job", 300, now=NOON + timedelta(seconds=20))
    assert ledger.expire_leases(now=NOON + timedelta(seconds=60)) == 0


def test_windows_are_utc_days_and_months(ledger: QuotaLedger, engine: Engine) -> None:
    before_midnight = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    after_midnight = before_midnight + timedelta(seconds=2)  # also a new month
    reserve(ledger, "late", 5, now=before_midnight)
    ledger.commit("late", 5, now=after_midnight)  # settles in the windows it reserved in
    status = ledger.usage("user:alice", limits=LIMITS, now=before_midnight)
    assert (status.window(Window.DAY).period, status.window(Window.DAY).used) == ("2026-11-30", 5)
    fresh = ledger.usage("user:alice", limits=LIMITS, now=after_midnight)
    assert fresh.window(Window.DAY).period == "2026-12-01"
    assert fresh.window(Window.DAY).remaining == 5 and fresh.window(Window.MONTH).remaining == 8
    reserve(ledger, "next-day", 5, now=after_midnight)
    # Time zones do not matter: 01:00+02:00 on Dec 2 is 23:00 UTC on Dec 1.
    cet = datetime(2026, 12, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert ledger.usage("user:alice", now=cet).window(Window.DAY).period == "2026-12-01"


def test_grant_tops_up_once_and_set_limit_overrides(ledger: QuotaLedger, engine: Engine) -> None:
    reserve(ledger, "r1", 5)
    assert ledger.grant(
        "user:alice", 3, window=Window.DAY, actor="ops", note="launch", grant_id="g1", now=NOON
    )
    assert not ledger.grant(
        "user:alice", 3, window=Window.DAY, actor="ops", grant_id="g1", now=NOON
    )
    reserve(ledger, "r2", 3)  # 5 + 3 granted = 8 for the day
    with pytest.raises(QuotaExceededError) as denied:
        reserve(ledger, "r3", 1)
    assert denied.value.window is Window.DAY and "0 of 8 images left" in str(denied.value)
    ledger.set_limit("user:alice", images_per_day=10, images_per_month=None, actor="ops")
    with pytest.raises(QuotaExceededError) as denied:
        reserve(ledger, "r3", 1)
    assert denied.value.window is Window.MONTH  # the policy's 8 a month still holds
    ledger.set_limit("user:alice", images_per_day=10, images_per_month=20, actor="ops")
    reserve(ledger, "r3", 1)
    status = ledger.usage("user:alice", limits=LIMITS, now=NOON)
    assert status.window(Window.DAY).limit == 10 and status.window(Window.DAY).granted == 3
    assert status.window(Window.DAY).remaining == 10 + 3 - 9
    assert status.window(Window.MONTH).limit == 20
    ledger.set_limit("user:alice", images_per_day=None, images_per_month=None, actor="ops")
    assert ledger.usage("user:alice", limits=LIMITS, now=NOON).window(Window.MONTH).limit == 8
    assert entry_kinds(engine)["set_limit"] == 3 and entry_kinds(engine)["grant"] == 1


def test_commit_can_join_the_callers_transaction(ledger: QuotaLedger, engine: Engine) -> None:
    """The worker commits the charge and its audit events in one transaction."""
    reserve(ledger, "r1", 2)

    def fail_after_commit(connection: Connection) -> None:
        ledger.commit("r1", 2, connection=connection)
        raise RuntimeError("the audit append failed")

    with pytest.raises(RuntimeError):
        run_write(engine, fail_after_commit)
    assert counter(engine, "user:alice", "day") == (0, 2, 0)  # rolled back together
    run_write(engine, lambda connection: ledger.commit("r1", 2, connection=connection))
    assert counter(engine, "user:alice", "day") == (2, 0, 0)


def test_what_a_commit_leaves_is_told_from_its_locked_rows(
    ledger: QuotaLedger, engine: Engine
) -> None:
    """The worker tells what is left from the counters its commit locked; that must be
    what a fresh read says, teams, overrides and grants included; a commit in a later
    period than its reservation (after midnight) reads the current rows instead."""
    team = (TeamBudget(DESIGN, images_per_day=6, images_per_month=40),)
    ledger.set_limit("user:alice", images_per_day=4, images_per_month=None, actor="admin")
    ledger.grant(TEAM, 2, window=Window.DAY, actor="admin", now=NOON)
    reserve(ledger, "other", 2, user="bob", teams=team)
    reserve(ledger, "r1", 3, teams=team)
    charged = ledger.commit("r1", 2, now=NOON)
    assert set(charged.counters) == {
        (s, w, p)
        for s in ("user:alice", TEAM)
        for w, p in (("day", "2026-11-21"), ("month", "2026-11"))
    }

    def both(now: datetime, known: Mapping[CounterKey, CounterState]) -> list[Remaining]:
        return [
            ledger.remaining(user="alice", teams=team, user_limits=LIMITS, now=now, known=k)
            for k in (known, None)
        ]

    told, read = both(NOON, charged.counters)
    assert told == read
    assert (read.day, read.month) == (2, 8 - 2)
    told, read = both(NOON + timedelta(days=1), charged.counters)  # a new day: nothing known
    assert told == read
    assert (read.day, read.month) == (4, 8 - 2)
    assert ledger.commit("r1", 2, now=NOON).counters == {}  # redelivered: nothing moved
