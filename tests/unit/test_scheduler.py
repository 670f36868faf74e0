from __future__ import annotations

from zimage_pipeline.messages import Priority
from zimage_pipeline.worker.scheduler import FairScheduler


def test_interactive_is_served_before_bulk() -> None:
    scheduler: FairScheduler[str] = FairScheduler(max_buffered_per_principal=10)
    scheduler.offer("bulk-1", priority=Priority.BULK, principal="team")
    scheduler.offer("std-1", priority=Priority.STANDARD, principal="bob")
    scheduler.offer("hero", priority=Priority.INTERACTIVE, principal="cms")
    assert scheduler.drain() == ["hero", "std-1", "bulk-1"]


def test_round_robin_across_principals_within_a_priority() -> None:
    scheduler: FairScheduler[str] = FairScheduler(max_buffered_per_principal=10)
    for i in range(3):
        scheduler.offer(f"bob-{i}", priority=Priority.STANDARD, principal="bob")
    scheduler.offer("alice-0", priority=Priority.STANDARD, principal="alice")
    assert scheduler.drain() == ["bob-0", "alice-0", "bob-1", "bob-2"]


def test_a_principal_over_its_share_is_refused_and_others_are_not() -> None:
    """Given bob already has his share waiting, when more of bob's requests arrive, they are
    refused (the worker defers them) while alice's request is still accepted."""
    scheduler: FairScheduler[str] = FairScheduler(max_buffered_per_principal=2)
    accepted = [
        scheduler.offer(f"bob-{i}", priority=Priority.BULK, principal="bob") for i in range(5)
    ]
    assert accepted == [True, True, False, False, False]
    assert scheduler.offer("alice-0", priority=Priority.BULK, principal="alice")
    assert scheduler.waiting_for("bob") == 2
    assert scheduler.take() == "bob-0"
    assert scheduler.offer("bob-5", priority=Priority.BULK, principal="bob")
    assert len(scheduler) == 3
