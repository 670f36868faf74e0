"""JobStore on SQLite and PostgreSQL: begin/takeover/conflict/terminal and the state machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.quota_support import migrated_engine
from zimage_pipeline.ledger.jobs import (
    BeginKind,
    IllegalTransitionError,
    JobNotFoundError,
    JobStatus,
    JobStore,
)

pytestmark = pytest.mark.integration

DIGEST = "a" * 64


@pytest.fixture
def store(ledger_url: str) -> Iterator[JobStore]:
    with migrated_engine(ledger_url) as engine:
        yield JobStore(engine)


def begin(
    store: JobStore, *, digest: str = DIGEST, principal: str = "cms-publisher", worker: str = "w1"
) -> object:
    return store.begin(
        request_id="req-1",
        payload_sha256=digest,
        principal=principal,
        on_behalf_of="alice",
        worker_id=worker,
    )


def test_the_happy_path_ends_terminal_with_its_result(store: JobStore) -> None:
    first = store.begin(
        request_id="req-1",
        payload_sha256=DIGEST,
        principal="cms",
        on_behalf_of="alice",
        worker_id="w1",
    )
    assert (first.kind, first.attempts, first.result) == (BeginKind.NEW, 1, None)
    snapshot = {"subject": {"roles": ["editor"]}}
    authorized = store.mark("req-1", "authorized", roles_snapshot=snapshot)
    assert (authorized.status, authorized.roles_snapshot) == (JobStatus.AUTHORIZED, snapshot)
    store.mark("req-1", JobStatus.RUNNING)
    done = store.finish(
        "req-1", "succeeded", reason=None, result={"status": "succeeded", "images": 2}
    )
    assert done.status is JobStatus.SUCCEEDED and done.finished_at is not None

    again = store.begin(
        request_id="req-1",
        payload_sha256=DIGEST,
        principal="cms",
        on_behalf_of="alice",
        worker_id="w2",
    )
    assert again.kind is BeginKind.TERMINAL
    assert again.result == {"status": "succeeded", "images": 2}
    assert again.job.worker_id == "w1"  # nothing changes on a terminal job


def test_an_unfinished_job_is_taken_over(store: JobStore) -> None:
    begin(store)
    store.mark("req-1", "authorized")
    store.mark("req-1", "running")
    takeover = begin(store, worker="w2")
    assert takeover.kind is BeginKind.NEW  # type: ignore[attr-defined]
    job = store.get("req-1")
    assert job is not None
    assert (job.attempts, job.worker_id, job.status) == (2, "w2", JobStatus.RECEIVED)


def test_same_id_different_payload_or_publisher_conflicts(store: JobStore) -> None:
    begin(store)
    assert begin(store, digest="b" * 64).kind is BeginKind.CONFLICT  # type: ignore[attr-defined]
    assert begin(store, principal="pim-sync").kind is BeginKind.CONFLICT  # type: ignore[attr-defined]
    store.mark("req-1", "authorized")
    store.mark("req-1", "running")
    store.finish("req-1", "succeeded", reason=None, result={"secret": "alice's images"})
    stranger = begin(store, principal="pim-sync")
    assert stranger.kind is BeginKind.CONFLICT and stranger.result is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("steps", "target"),
    [
        ((), "running"),  # received -> running skips authorization
        (("authorized",), "received"),
        (("authorized", "running"), "authorized"),
    ],
)
def test_illegal_moves_raise(store: JobStore, steps: tuple[str, ...], target: str) -> None:
    begin(store)
    for step in steps:
        store.mark("req-1", step)
    with pytest.raises(IllegalTransitionError) as illegal:
        store.mark("req-1", target)
    assert illegal.value.reason == "ILLEGAL_TRANSITION"


def test_terminal_states_are_final_and_finish_is_idempotent(store: JobStore) -> None:
    begin(store)
    with pytest.raises(IllegalTransitionError, match="use finish"):
        store.mark("req-1", "rejected")
    with pytest.raises(IllegalTransitionError, match="use mark"):
        store.finish("req-1", "running", reason=None, result={})
    with pytest.raises(IllegalTransitionError):
        store.finish("req-1", "succeeded", reason=None, result={})  # never ran
    store.finish("req-1", "rejected", reason="QUOTA_EXCEEDED", result={"status": "rejected"})
    store.finish("req-1", "rejected", reason="QUOTA_EXCEEDED", result={"status": "rejected"})
    with pytest.raises(IllegalTransitionError):
        store.finish("req-1", "failed", reason="X", result={})
    job = store.get("req-1")
    assert job is not None and (job.status, job.reason) == (JobStatus.REJECTED, "QUOTA_EXCEEDED")
    with pytest.raises(JobNotFoundError):
        store.mark("nope", "authorized")
    assert store.get("nope") is None


def test_cancel_only_before_running_and_only_by_its_parties(store: JobStore) -> None:
    begin(store)
    assert not store.cancel("req-1", principal="mallory")
    assert store.cancel("req-1", principal="alice", result={"status": "cancelled"})
    assert store.cancel("req-1", principal="alice")  # already cancelled
    assert begin(store).result == {"status": "cancelled"}  # type: ignore[attr-defined]
    store.begin(
        request_id="req-2",
        payload_sha256=DIGEST,
        principal="cms",
        on_behalf_of="bob",
        worker_id="w",
    )
    store.mark("req-2", "authorized")
    store.mark("req-2", "running")
    assert not store.cancel("req-2", principal="cms")
    assert not store.cancel("unknown", principal="cms")


def test_cancels_whose_request_never_came_are_forgotten_after_their_wait(
    store: JobStore,
) -> None:
    """Found by a probe: a cancel of an id nobody uses left a row forever, so any client
    could grow the ledger without bound. The housekeeping job deletes such rows after
    `worker.cancel_wait_days`; an adopted cancel (its request came) and jobs stay."""
    from datetime import timedelta

    from zimage_pipeline.ledger.txn import utcnow
    from zimage_pipeline.wiring.jobs import TOMBSTONE, LedgerJobs

    jobs = LedgerJobs(store, busy_s=0.0)
    for rid in ("ghost-1", "ghost-2", "came-1"):
        jobs.cancel(rid, principal="bob")
    assert jobs.begin(
        request_id="came-1",
        payload_sha256=DIGEST,
        principal="bob",
        on_behalf_of="bob",
        worker_id="w1",
    ).cancelled_on_arrival
    assert jobs.adopt_cancelled(
        "came-1", payload_sha256=DIGEST, on_behalf_of="bob", result={"status": "cancelled"}
    )
    begin(store)  # an ordinary job, req-1
    assert store.forget_cancels_older_than(TOMBSTONE, utcnow() - timedelta(days=7)) == 0
    assert store.forget_cancels_older_than(TOMBSTONE, utcnow() + timedelta(seconds=1)) == 2
    assert store.get("ghost-1") is None and store.get("ghost-2") is None
    assert store.get("came-1") is not None and store.get("req-1") is not None
