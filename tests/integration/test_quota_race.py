"""200 concurrent reservations from 4 processes against a quota of 10 grant exactly 10,
on SQLite and on PostgreSQL; after commits and releases, used + reserved add up."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.quota_support import (
    counter,
    entry_kinds,
    migrated_engine,
    reservation_totals,
)
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_types import QuotaExceededError, team_subject
from zimage_pipeline.policy import QuotaLimits, TeamBudget

pytestmark = pytest.mark.integration

PROCESSES = 4
PER_PROCESS = 50
THREADS = 8
QUOTA = 10
TEAM = TeamBudget("cn=design-team,ou=groups,dc=example,dc=org", images_per_day=1000)
LIMITS = QuotaLimits(images_per_day=QUOTA, images_per_month=1000)


def _contend(url: str, index: int, ready: Any, go: Any, results: Any) -> None:
    """One process: PER_PROCESS reservations from THREADS threads, all released at once."""
    from zimage_pipeline.ledger.db import create_ledger_engine
    from zimage_pipeline.settings import DatabaseSettings

    engine = create_ledger_engine(DatabaseSettings(url=url, pool_size=THREADS))
    ledger = QuotaLedger(engine)

    def attempt(n: int) -> str:
        request_id = f"p{index}-r{n}"
        try:
            ledger.reserve(
                request_id=request_id,
                user="alice",
                teams=(TEAM,),
                images=1,
                user_limits=LIMITS,
                lease_s=600,
            )
        except QuotaExceededError:
            return "denied"
        except Exception as exc:  # anything else is a failure the parent reports
            return f"error {type(exc).__name__}: {exc}"
        return request_id

    with engine.connect():  # warm one connection before the start line
        pass
    ready.put(index)
    go.wait(60)
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(attempt, range(PER_PROCESS)))
    engine.dispose()
    results.put(outcomes)


def test_concurrent_reservations_never_overspend(ledger_url: str) -> None:
    with migrated_engine(ledger_url) as engine:
        # Given a quota of 10 and 4 processes ready to reserve 50 times each
        context = multiprocessing.get_context("spawn")
        ready, results, go = context.Queue(), context.Queue(), context.Event()
        workers = [
            context.Process(target=_contend, args=(ledger_url, i, ready, go, results))
            for i in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=120)

        # When they all start at once
        go.set()
        outcomes = [o for _ in workers for o in results.get(timeout=300)]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0

        # Then exactly 10 are granted, the rest denied, and nothing else happened
        errors = [o for o in outcomes if o.startswith("error")]
        assert errors == []
        granted = [o for o in outcomes if o != "denied"]
        assert len(outcomes) == PROCESSES * PER_PROCESS
        assert len(granted) == QUOTA
        assert counter(engine, "user:alice", "day") == (0, QUOTA, 0)
        assert counter(engine, team_subject(TEAM.group), "day") == (0, QUOTA, 0)
        assert entry_kinds(engine) == {"reserve": QUOTA}

        # When 6 commit (one twice, as a redelivery would) and 4 release (one twice)
        ledger = QuotaLedger(engine)
        for request_id in granted[:6]:
            ledger.commit(request_id, 1)
        ledger.commit(granted[0], 1)
        for request_id in granted[6:]:
            ledger.release(request_id, "ENGINE_FAILED")
        ledger.release(granted[6], "ENGINE_FAILED")

        # Then used + reserved add up exactly, per subject and per window
        for subject in ("user:alice", team_subject(TEAM.group)):
            for window in ("day", "month"):
                assert counter(engine, subject, window) == (6, 0, 0)
        assert reservation_totals(engine) == {"committed": 6, "released": 4}
        assert entry_kinds(engine) == {"reserve": 10, "commit": 6, "release": 4}
