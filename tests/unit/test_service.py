"""The request service (the core) against in-memory fakes of its ports."""

from __future__ import annotations

import asyncio
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.fakes import (
    GENEROUS,
    FakeAuthorizer,
    FakeEncoder,
    FakeEngine,
    FakeStore,
    fake_ledger,
)
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.errors import DependencyUnavailable, Disposition, InvalidRequestError
from zimage_pipeline.junk_audit import JunkAuditBudget
from zimage_pipeline.messages import Status
from zimage_pipeline.ports import Limits
from zimage_pipeline.service import (
    Ports,
    RequestService,
    ServiceConfig,
    effective_seed,
    payload_digest,
)

POOL = ThreadPoolExecutor(max_workers=2)


def make(
    heartbeat_s: float = 0.0, max_job_attempts: int = 0, **overrides: Any
) -> tuple[RequestService, Ports]:
    ledger = fake_ledger(daily=3)
    ports = Ports(
        jobs=ledger.jobs,
        authorizer=FakeAuthorizer(users={"alice": GENEROUS}, delegators={"cms"}),
        ledger=ledger,
        engine=FakeEngine(),
        encoder=FakeEncoder(),
        store=FakeStore(),
        audit=ledger.audit,
    )
    for name, value in overrides.items():
        setattr(ports, name, value)
    return RequestService(
        ports,
        ServiceConfig(worker_id="w1", heartbeat_s=heartbeat_s, max_job_attempts=max_job_attempts),
        gpu_executor=POOL,
        io_executor=POOL,
    ), ports


def body(request_id: str = "r1", **fields: Any) -> bytes:
    return json.dumps(
        {
            "request_id": request_id,
            "on_behalf_of": "alice",
            "prompt": "a cat",
            "width": 64,
            "height": 64,
            **fields,
        }
    ).encode()


async def test_success_charges_once_and_records_every_step() -> None:
    service, ports = make()
    outcome = await service.handle(body(num_images=2, seed=100), principal="alice")
    result = outcome.result
    assert result.status is Status.SUCCEEDED
    assert [i.seed for i in result.images] == [100, 101]
    assert result.quota_remaining is not None and result.quota_remaining.day == 1
    assert ports.ledger.quota.committed == {"r1": ("alice", 2)}  # type: ignore[attr-defined]
    events = [e for _, e in ports.audit.events]  # type: ignore[attr-defined]
    assert events == [
        "received",
        "authorized",
        "quota_reserved",
        "generated",
        "stored",
        "quota_committed",
    ]


async def test_seed_is_drawn_reproducibly_and_recorded() -> None:
    request = decode_request(body())
    seed = effective_seed(request, payload_digest(request))
    assert seed == effective_seed(request, payload_digest(request))
    service, _ = make()
    result = (await service.handle(body(), principal="alice")).result
    assert result.images[0].seed == seed


async def test_redelivery_after_success_republishes_without_generating() -> None:
    service, ports = make()
    first = await service.handle(body(), principal="alice")
    again = await service.handle(body(), principal="alice")
    assert again.republished and again.result == first.result
    assert len(ports.engine.calls) == 1  # type: ignore[attr-defined]


async def test_a_finished_request_is_answered_while_the_directory_is_down() -> None:
    """The directory is asked before the ledger; a redelivery of a finished request is
    answered from the ledger, whatever the directory says meanwhile."""
    service, ports = make()
    first = await service.handle(body(), principal="alice")
    ports.authorizer.unavailable_times = 1  # type: ignore[attr-defined]
    again = await service.handle(body(), principal="alice")
    assert again.republished and again.result == first.result
    assert ports.authorizer.calls == 2  # type: ignore[attr-defined]


async def test_quota_exceeded_is_rejected_and_nothing_is_charged() -> None:
    service, ports = make()
    result = (await service.handle(body(num_images=4), principal="alice")).result
    assert (result.status, result.reason) == (Status.REJECTED, "QUOTA_EXCEEDED")
    assert not ports.ledger.quota.committed and not ports.engine.calls  # type: ignore[attr-defined]


async def test_first_deliveries_are_admitted_in_one_step_and_the_rest_step_by_step() -> None:
    """A first, authorized delivery within its quota is admitted by admit_new (one
    ledger transaction); a refusal or a redelivery falls back to begin + admit, which
    records the same trail."""
    service, ports = make()
    ok = (await service.handle(body("r1"), principal="alice")).result
    again = await service.handle(body("r1"), principal="alice")
    refused = (await service.handle(body("r2", num_images=4), principal="alice")).result
    assert ok.status is Status.SUCCEEDED and again.republished
    assert (refused.status, refused.reason) == (Status.REJECTED, "QUOTA_EXCEEDED")
    assert ports.ledger.fast_admissions == 1  # type: ignore[attr-defined]
    events = [(r, e) for r, e in ports.audit.events]  # type: ignore[attr-defined]
    assert [e for r, e in events if r == "r2"][:2] == ["received", "authorized"]
    assert set(ok.timings_s) >= {"authorize", "reserve", "generate", "store"}


async def test_policy_limits_name_what_was_exceeded() -> None:
    tight = Limits(
        generate=True,
        delegate=False,
        max_pixels=64 * 64,
        max_side=64,
        max_images=1,
        max_steps=4,
        formats=GENEROUS.formats,
        priorities=GENEROUS.priorities,
    )
    service, _ = make(authorizer=FakeAuthorizer(users={"alice": tight}))
    result = (
        await service.handle(body(width=128, steps=8, num_images=2), principal="alice")
    ).result
    assert result.reason == "POLICY_VIOLATION"
    assert result.message is not None
    for named in ("width/height", "num_images", "steps"):
        assert named in result.message


async def test_user_without_generation_role_is_rejected() -> None:
    no_role = (
        Limits(**{**GENEROUS.__dict__, "generate": False})
        if hasattr(GENEROUS, "__dict__")
        else None
    )
    limits = no_role or Limits(False, False, 1, 1, 1, 1, frozenset(), frozenset())
    service, _ = make(authorizer=FakeAuthorizer(users={"alice": limits}))
    result = (await service.handle(body(), principal="alice")).result
    assert (result.status, result.reason) == (Status.REJECTED, "NOT_AUTHORIZED")


async def test_expired_request_ends_expired_without_charge() -> None:
    service, ports = make()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    result = (await service.handle(body(expires_at=past), principal="alice")).result
    assert result.status is Status.EXPIRED
    assert not ports.ledger.quota.reserved and not ports.ledger.quota.committed  # type: ignore[attr-defined]


async def test_transient_failure_propagates_for_retry_and_keeps_no_charge() -> None:
    service, ports = make(store=FakeStore(failures=1))
    with pytest.raises(DependencyUnavailable) as excinfo:
        await service.handle(body(), principal="alice")
    assert excinfo.value.disposition is Disposition.RETRY
    assert not ports.ledger.quota.committed  # type: ignore[attr-defined]
    result = (await service.handle(body(), principal="alice")).result  # the retry
    assert result.status is Status.SUCCEEDED
    assert ports.ledger.quota.committed == {"r1": ("alice", 1)}  # type: ignore[attr-defined]


async def test_storage_lost_mid_request_discards_the_partial_upload() -> None:
    store = FakeStore(lost_after=1)
    service, ports = make(store=store)
    result = (await service.handle(body(num_images=2), principal="alice")).result
    assert (result.status, result.reason) == (Status.FAILED, "STORAGE_FAILED")
    assert store.objects == {}  # image 0 was stored, then deleted
    assert ports.ledger.discards == set()  # type: ignore[attr-defined]
    events = [e for _, e in ports.audit.events]  # type: ignore[attr-defined]
    assert events[-3:] == ["failed", "quota_released", "outputs_discarded"]
    assert not ports.ledger.quota.committed  # type: ignore[attr-defined]


async def test_discard_the_store_refuses_stays_queued_for_the_sweep() -> None:
    store = FakeStore(lost_after=1)
    store.down = True
    service, ports = make(store=store)
    result = (await service.handle(body(num_images=2), principal="alice")).result
    assert (result.status, result.reason) == (Status.FAILED, "STORAGE_FAILED")  # unchanged
    assert list(store.objects) == ["t/r1/0.png"]
    assert ports.ledger.discards == {"r1"}  # type: ignore[attr-defined]
    events = [e for _, e in ports.audit.events]  # type: ignore[attr-defined]
    assert "outputs_discarded" not in events


async def test_failure_before_any_upload_queues_no_discard() -> None:
    service, ports = make()
    result = (await service.handle(body(num_images=4), principal="alice")).result
    assert result.reason == "QUOTA_EXCEEDED"
    assert ports.ledger.discards == set()  # type: ignore[attr-defined]


async def test_request_started_too_often_ends_failed_without_running_again() -> None:
    service, ports = make(max_job_attempts=2)
    request = decode_request(body())
    for worker in ("w-dead-1", "w-dead-2"):  # two starts whose workers died mid-request
        ports.jobs.begin(
            request_id="r1",
            payload_sha256=payload_digest(request),
            principal="alice",
            on_behalf_of="alice",
            worker_id=worker,
        )
    outcome = await service.handle(body(), principal="alice")
    assert (outcome.result.status, outcome.result.reason) == (Status.FAILED, "ATTEMPTS_EXHAUSTED")
    assert "started 3 times" in (outcome.result.message or "")
    assert outcome.dead_letter  # the poison goes to the DLQ for a person to look at
    assert not ports.engine.calls  # type: ignore[attr-defined]
    events = [e for _, e in ports.audit.events]  # type: ignore[attr-defined]
    assert events == ["received", "failed"]  # no hold was left: no release recorded
    again = await service.handle(body(), principal="alice")  # a later redelivery
    assert again.republished and again.result == outcome.result


async def test_request_within_its_attempts_runs() -> None:
    service, ports = make(max_job_attempts=2)
    request = decode_request(body())
    ports.jobs.begin(
        request_id="r1",
        payload_sha256=payload_digest(request),
        principal="alice",
        on_behalf_of="alice",
        worker_id="w-dead",
    )
    assert (await service.handle(body(), principal="alice")).result.status is Status.SUCCEEDED


async def test_missing_publisher_identity_is_rejected() -> None:
    service, _ = make()
    outcome = await service.handle(body(), principal=None)
    assert outcome.dead_letter and outcome.result.reason == "UNAUTHENTICATED_PUBLISHER"


async def test_cancelled_before_arrival_answers_cancelled() -> None:
    service, ports = make()
    assert await service.cancel("r1", principal="alice")
    outcome = await service.handle(body(), principal="alice")
    assert outcome.result.status is Status.CANCELLED
    assert not ports.engine.calls  # type: ignore[attr-defined]


async def test_priority_must_match_the_queue_it_came_from() -> None:
    from zimage_pipeline.messages import Priority

    service, ports = make()
    outcome = await service.handle(
        body(priority="bulk"), principal="alice", routed_as=Priority.INTERACTIVE
    )
    assert outcome.dead_letter and outcome.result.reason == "INVALID_REQUEST"
    assert "routing key" in (outcome.result.message or "")
    assert not ports.engine.calls  # type: ignore[attr-defined]


async def test_a_running_job_beats_until_it_ends() -> None:
    ledger = fake_ledger()
    service, _ = make(
        heartbeat_s=0.1, engine=FakeEngine(delay_s=0.35), ledger=ledger, jobs=ledger.jobs
    )
    outcome = await service.handle(body("beat-1"), principal="alice")
    assert outcome.result.status is Status.SUCCEEDED
    beats = ledger.jobs.rows["beat-1"].get("beats", 0)
    assert beats >= 2  # generation alone took 0.35 s
    await asyncio.sleep(0.3)
    assert ledger.jobs.rows["beat-1"].get("beats", 0) == beats  # stopped at the end


async def test_a_malformed_message_never_claims_or_speaks_for_an_id() -> None:
    service, ports = make()
    ledger = ports.ledger
    junk = json.dumps(
        {"request_id": "j1", "on_behalf_of": "alice", "prompt": "", "labels": {"sku": "S1"}}
    ).encode()
    first = await service.handle(junk, principal="alice")
    assert first.dead_letter and first.result.request_id == ""
    assert first.result.claimed_request_id == "j1"  # the publisher knows which failed
    assert (first.result.on_behalf_of, first.result.labels) == ("alice", {"sku": "S1"})
    assert first.result.reason == "INVALID_REQUEST"
    assert "j1" not in ledger.jobs.rows  # type: ignore[attr-defined]  # nothing claimed
    again = await service.handle(junk, principal="alice")  # a redelivery: the same answer
    assert again.result.model_dump(exclude={"finished_at"}) == first.result.model_dump(
        exclude={"finished_at"}
    )
    # So junk cannot squat an id: a real request under it runs.
    assert (await service.handle(body("j1"), principal="alice")).result.status is (Status.SUCCEEDED)
    # Junk under a taken id is answered without it and writes nothing under it...
    bad = json.dumps({"request_id": "j1", "on_behalf_of": "bob", "width": 3}).encode()
    events_before = list(ports.audit.events)  # type: ignore[attr-defined]
    stranger = await service.handle(bad, principal="bob")
    assert stranger.dead_letter and stranger.result.request_id == ""
    assert ledger.jobs.rows["j1"]["status"] == "succeeded"  # type: ignore[attr-defined]
    # ... and it leaves its trail under an id of its own bytes, naming what it claimed.
    new_events = ports.audit.events[len(events_before) :]  # type: ignore[attr-defined]
    assert new_events == [("unidentified-" + hashlib.sha256(bad).hexdigest()[:32], "denied")]


async def test_refusals_of_a_message_never_speak_for_someone_elses_request() -> None:
    service, ports = make()
    assert (await service.handle(body("owned-1"), principal="alice")).result.status is (
        Status.SUCCEEDED
    )
    trail = [e for e in ports.audit.events if e[0] == "owned-1"]  # type: ignore[attr-defined]
    # The same id without a publisher, or reused by its publisher for another body:
    for principal, payload in ((None, body("owned-1")), ("alice", body("owned-1", prompt="x"))):
        outcome = await service.handle(payload, principal=principal)
        assert outcome.dead_letter and outcome.result.request_id == ""
        assert outcome.result.claimed_request_id == "owned-1"
        assert outcome.result.reason in ("UNAUTHENTICATED_PUBLISHER", "REQUEST_ID_CONFLICT")
        await service.record_published(outcome.result, principal=principal or "")
    # Another publisher's request under the id is its own, keyed apart (as LedgerJobs does;
    # the fake said REQUEST_ID_CONFLICT here until the port contract held it to the ledger).
    foreign = await service.handle(body("owned-1", prompt="x"), principal="bob")
    assert foreign.result.request_id == "owned-1" and foreign.ledger_key != "owned-1"
    await service.record_published(foreign.result, principal="bob", ledger_key=foreign.ledger_key)
    assert [e for e in ports.audit.events if e[0] == "owned-1"] == trail  # type: ignore[attr-defined]


def test_a_prompt_of_invisible_characters_is_blank() -> None:
    for prompt in ("\u200b\u200b", " \u200d\ufeff ", "\u2060"):
        with pytest.raises(InvalidRequestError, match=r"prompt: .*blank"):
            decode_request(body("zw-1", prompt=prompt))
    assert decode_request(body("zw-2", prompt="\u200bcat")).prompt == "\u200bcat"


async def test_a_message_without_a_readable_id_is_audited_under_its_digest() -> None:
    service, ports = make()
    junk = b"\xff not json"
    outcome = await service.handle(junk, principal="mallory")
    assert outcome.dead_letter and outcome.result.request_id == ""
    assert outcome.result.reason == "INVALID_REQUEST"
    expected = ("unidentified-" + hashlib.sha256(junk).hexdigest()[:32], "denied")
    assert ports.audit.events == [expected]  # type: ignore[attr-defined]
    assert ports.jobs.rows == {}  # type: ignore[attr-defined]  # no job for junk


def test_junk_audit_budget_writes_a_few_then_one_summary_per_window() -> None:
    budget = JunkAuditBudget(per_window=3, window_s=60)
    admitted = [budget.admit("mallory", "INVALID_REQUEST", now=100 + i) for i in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert budget.admit("alice", "INVALID_REQUEST", now=105)  # a budget per publisher
    assert budget.take_summaries(now=150) == []  # the window is still open
    # After the window, a new one starts only once the old count is taken.
    assert not budget.admit("mallory", "UNAUTHENTICATED_PUBLISHER", now=170)
    [summary] = budget.take_summaries(now=170)
    assert summary.publisher == "mallory"
    assert summary.payload()["suppressed"] == 8
    assert summary.payload()["reasons"] == {"INVALID_REQUEST": 7, "UNAUTHENTICATED_PUBLISHER": 1}
    assert summary.request_id.startswith("unidentified-summary-")
    assert budget.admit("mallory", "INVALID_REQUEST", now=171)


async def test_a_junk_stream_grows_the_audit_chain_by_a_bounded_amount() -> None:
    service, ports = make()
    for i in range(200):
        await service.handle(b"junk %d" % i, principal="mallory")
    events = ports.audit.events  # type: ignore[attr-defined]
    assert len(events) == JunkAuditBudget().per_window  # the rest are counted
    await service.flush_junk_summaries(all_windows=True)
    summary = ports.audit.events[-1]  # type: ignore[attr-defined]
    assert summary[0].startswith("unidentified-summary-") and summary[1] == "denied_summary"
