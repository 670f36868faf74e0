"""The fault matrix's invariant checker fails on broken books.

A small ledger (SQLite, migrated like production) is written through the project's own
JobStore, QuotaLedger and AuditLog as the service would: one succeeded request, one
rejected. The checker passes on it, then each test breaks one thing (an orphan object, a
double charge, an open reservation, a disagreeing republish, an edited audit event, ...)
and the checker must name it. A checker that cannot fail proves nothing.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.integration.fault_matrix.invariants import (
    BrokerView,
    ObjectInfo,
    Sighting,
    World,
    find_problems,
    read_ledger,
)
from zimage_pipeline.audit import AuditLog, verify_chain
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.jobs import JobStore
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.messages import GenerationResult, Status
from zimage_pipeline.policy import QuotaLimits
from zimage_pipeline.settings import AuditSettings, DatabaseSettings

PREFIX = "fm-unit"
LIMITS = QuotaLimits(images_per_day=10, images_per_month=100)
BUCKET = "zimage-images"


def _sha(text_: str) -> str:
    return hashlib.sha256(text_.encode()).hexdigest()


def _keys(rid: str, images: int) -> tuple[list[str], str]:
    base = f"{PREFIX}/2026/03/01/{rid}"
    return [f"{base}/{n}.png" for n in range(images)], f"{base}/audit.json"


def _succeeded(rid: str, images: int) -> dict[str, Any]:
    keys, record = _keys(rid, images)
    result = GenerationResult(
        request_id=rid,
        status=Status.SUCCEEDED,
        on_behalf_of="alice",
        images=[
            {
                "bucket": BUCKET,
                "key": key,
                "sha256": _sha(key),
                "bytes": 100,
                "width": 64,
                "height": 64,
                "format": "png",
                "seed": 7 + n,
            }
            for n, key in enumerate(keys)
        ],
        audit_record_key=record,
        finished_at=datetime(2026, 3, 1, tzinfo=UTC),
    )
    return result.model_dump(mode="json", by_alias=True)


def _rejected(rid: str, reason: str) -> dict[str, Any]:
    result = GenerationResult(
        request_id=rid,
        status=Status.REJECTED,
        reason=reason,
        message="no",
        finished_at=datetime(2026, 3, 1, tzinfo=UTC),
    )
    return result.model_dump(mode="json", by_alias=True)


class Books:
    """A ledger written the way the service writes it, plus the objects and results."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs = JobStore(engine)
        self.quota = QuotaLedger(engine)
        self.audit = AuditLog.from_settings(engine, AuditSettings())
        self.objects: dict[str, ObjectInfo] = {}
        self.results: list[dict[str, Any]] = []

    def event(self, rid: str, kind: str, payload: dict[str, Any]) -> None:
        self.audit.append(request_id=rid, event_type=kind, actor="alice", payload=payload)

    def begin(self, rid: str) -> None:
        self.jobs.begin(
            request_id=rid,
            payload_sha256=_sha(rid),
            principal="alice",
            on_behalf_of="alice",
            worker_id="w1",
        )
        self.event(rid, "received", {"user": "alice", "prompt": "a fox"})

    def succeed(self, rid: str, images: int) -> dict[str, Any]:
        self.begin(rid)
        self.jobs.mark(rid, "authorized")
        self.quota.reserve(
            request_id=rid, user="alice", teams=(), images=images, user_limits=LIMITS, lease_s=60
        )
        self.jobs.mark(rid, "running")
        result = _succeeded(rid, images)
        keys, record = _keys(rid, images)
        for key in [*keys, record]:
            self.objects[key] = ObjectInfo(key, _sha(key) if key in keys else None, 100, rid)
        self.event(
            rid,
            "stored",
            {
                "objects": [{"key": k, "sha256": _sha(k), "bytes": 100} for k in keys],
                "audit_record_key": record,
            },
        )
        self.quota.commit(rid, images)
        self.event(rid, "quota_committed", {"images": images})
        self.jobs.finish(rid, "succeeded", reason=None, result=result)
        self.publish(result)
        return result

    def reject(self, rid: str, reason: str) -> dict[str, Any]:
        self.begin(rid)
        result = _rejected(rid, reason)
        self.event(rid, "denied", {"user": "alice", "reason": reason})
        self.jobs.finish(rid, "rejected", reason=reason, result=result)
        self.publish(result)
        return result

    def publish(self, result: dict[str, Any]) -> None:
        # As the worker publishes it: JSON without nulls.
        self.results.append(
            GenerationResult.model_validate(result).model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        )
        self.event(result["request_id"], "published", {"status": result["status"]})

    def world(self) -> World:
        world = read_ledger(self.engine)
        world.objects = dict(self.objects)
        world.results = list(self.results)
        world.chain_problems = [p.describe() for p in verify_chain(self.engine).problems]
        return world

    def sql(self, statement: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    engine = create_ledger_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'ledger.db'}"))
    migrate.upgrade(engine)
    b = Books(engine)
    b.succeed("ok-1", 2)
    b.reject("no-1", "NOT_AUTHORIZED")
    try:
        yield b
    finally:
        engine.dispose()


def problems_of(books: Books, world: World | None = None, **kwargs: Any) -> list[str]:
    return find_problems(world or books.world(), expected={"ok-1", "no-1"}, **kwargs)


def assert_named(problems: list[str], *words: str) -> None:
    assert problems, "the checker found nothing wrong in a broken state"
    text_ = "\n".join(problems)
    for word in words:
        assert word in text_, f"{word!r} not in:\n{text_}"


def test_balanced_books_pass(books: Books) -> None:
    assert problems_of(books) == []


def test_a_republish_of_the_same_result_is_fine(books: Books) -> None:
    books.results.append(copy.deepcopy(books.results[0]))
    assert problems_of(books) == []


def test_orphan_object_fails(books: Books) -> None:
    key = f"{PREFIX}/2026/03/01/ok-1/2.png"
    books.objects[key] = ObjectInfo(key, _sha(key), 100, "ok-1")
    assert_named(problems_of(books), key, "orphan")


def test_missing_object_fails(books: Books) -> None:
    key = _keys("ok-1", 2)[0][1]
    del books.objects[key]
    assert_named(problems_of(books), key, "not in the store")


def test_object_with_other_bytes_fails(books: Books) -> None:
    key = _keys("ok-1", 2)[0][0]
    books.objects[key] = ObjectInfo(key, _sha("other bytes"), 100, "ok-1")
    assert_named(problems_of(books), key, "sha256")


def test_double_charge_in_the_counters_fails(books: Books) -> None:
    books.sql("UPDATE quota_counters SET used = used + 2 WHERE window_kind = 'day'")
    assert_named(problems_of(books), "counter", "used 4")


def test_charge_without_stored_images_fails(books: Books) -> None:
    # A rejected request that was nevertheless reserved and committed: a charge for nothing.
    books.quota.reserve(
        request_id="no-1", user="alice", teams=(), images=1, user_limits=LIMITS, lease_s=60
    )
    books.quota.commit("no-1", 1)
    assert_named(problems_of(books), "no-1: rejected but charged 1", "commit entry")


def test_charged_differently_from_stored_fails(books: Books) -> None:
    books.sql("UPDATE quota_reservations SET committed = 1 WHERE request_id = 'ok-1'")
    assert_named(problems_of(books), "2 image(s) stored, 1 charged")


def test_open_reservation_fails(books: Books) -> None:
    books.begin("stuck-1")
    books.quota.reserve(
        request_id="stuck-1", user="alice", teams=(), images=1, user_limits=LIMITS, lease_s=60
    )
    problems = find_problems(books.world(), expected={"ok-1", "no-1", "stuck-1"})
    assert_named(problems, "stuck-1: reservation left reserved", "not terminal", "no result")


def test_expired_reservation_fails(books: Books) -> None:
    books.sql("UPDATE quota_reservations SET state = 'expired' WHERE request_id = 'ok-1'")
    assert_named(problems_of(books), "ok-1: reservation left expired")


def test_a_published_result_that_disagrees_fails(books: Books) -> None:
    other = dict(books.results[0])
    other["status"], other["reason"], other["images"] = "failed", "STORAGE_FAILED", []
    books.results.append(other)
    assert_named(problems_of(books), "ok-1: a published result differs")


def test_an_expected_request_without_outcome_fails(books: Books) -> None:
    problems = find_problems(books.world(), expected={"ok-1", "no-1", "lost-1"})
    assert_named(problems, "lost-1: no job row", "lost-1: no result was published")


def test_a_success_published_for_an_unknown_request_fails(books: Books) -> None:
    ghost = dict(books.results[0], request_id="ghost-1")
    books.results.append(ghost)
    assert_named(problems_of(books), "ghost-1", "never saw")


def test_stored_event_naming_other_keys_fails(books: Books) -> None:
    books.event("ok-1", "stored", {"objects": [{"key": "elsewhere/0.png"}]})
    assert_named(problems_of(books), "ok-1: 'stored' event", "elsewhere/0.png")


def test_success_without_stored_event_fails(books: Books) -> None:
    books.sql("UPDATE audit_events SET event_type = 'generated' WHERE event_type = 'stored'")
    # The edit also breaks the chain: both are reported.
    assert_named(problems_of(books), "without a 'stored' audit event", "edited")


def test_edited_audit_event_breaks_the_chain(books: Books) -> None:
    books.sql(
        "UPDATE audit_events SET payload = :p WHERE event_type = 'quota_committed'",
        p='{"images":2,"note":"edited"}',
    )
    assert_named(problems_of(books), "audit chain", "edited")


def test_deleted_audit_event_breaks_the_chain(books: Books) -> None:
    books.sql("DELETE FROM audit_events WHERE event_type = 'denied'")
    assert_named(problems_of(books), "audit chain", "missing", "without a 'denied' audit event")


def test_a_pre_ledger_rejection_leaves_only_its_published_event(books: Books) -> None:
    rejection = _rejected("junk-1", "INVALID_REQUEST")
    books.results.append(rejection)
    books.event("junk-1", "published", {"status": "rejected", "reason": "INVALID_REQUEST"})
    assert problems_of(books) == []
    books.event("junk-1", "quota_reserved", {"images": 1})
    assert_named(problems_of(books), "junk-1: audit events", "without a job row")


def test_an_unidentified_message_leaves_only_its_denied_event(books: Books) -> None:
    books.event("unidentified-0f0f", "denied", {"reason": "INVALID_REQUEST"})
    assert problems_of(books) == []
    books.event("unidentified-0f0f", "stored", {"objects": []})
    assert_named(problems_of(books), "unidentified-0f0f: audit events", "without a job row")


def _broker_problems(results: list[dict[str, Any]], broker: BrokerView, **kwargs: Any) -> list[str]:
    return find_problems(World(results=results, broker=broker), **kwargs)


def test_broker_side_balances_one_result_per_message_and_timely_copies() -> None:
    broker = BrokerView(
        sightings=[
            Sighting("a"),
            Sighting("a"),  # a duplicate message: answered twice
            Sighting("a", copy_id="c1", delay_s=1, republished_at_ms=1000, arrived_at_ms=2100),
        ],
        leftover={"q.retry.1s": 0, "q.standard": 0},
    )
    answers = [_rejected("a", "INVALID_REQUEST"), _rejected("a", "INVALID_REQUEST")]
    assert not [p for p in _broker_problems(answers, broker) if "ledger never saw" not in p]


@pytest.mark.parametrize(
    ("sightings", "results", "leftover", "message"),
    [
        ([Sighting("a")], 2, {}, "2 result(s) published for 1 request message(s)"),
        ([Sighting("a"), Sighting("b")], 1, {}, "1 result(s) published for 2"),
        (
            [Sighting("a"), *[Sighting("a", copy_id="c1")] * 2],
            1,
            {},
            "copy c1 came back 2 times",
        ),
        (
            [Sighting("a"), Sighting("a", "c1", 1, 1000, 31000)],
            1,
            {},
            "asked for 1 s and came back after 30.00 s",
        ),
        ([Sighting("a")], 1, {"q.retry.30s": 3}, "q.retry.30s: 3 message(s) left"),
    ],
)
def test_broker_side_names_storms_late_copies_and_leftovers(
    sightings: list[Sighting], results: int, leftover: dict[str, int], message: str
) -> None:
    broker = BrokerView(sightings=sightings, leftover=leftover)
    answers = [_rejected("a", "INVALID_REQUEST")] * results
    assert any(message in p for p in _broker_problems(answers, broker)), message


def test_broker_side_allows_the_crash_cases_extra_republishes() -> None:
    broker = BrokerView(sightings=[Sighting("a")])
    answers = [_rejected("a", "INVALID_REQUEST")] * 2
    assert any("2 result(s)" in p for p in _broker_problems(answers, broker))
    assert not any("result(s)" in p for p in _broker_problems(answers, broker, extra_results=1))


def test_a_copy_due_while_the_broker_was_down_may_come_back_when_it_is_up() -> None:
    # Sent at 1 s for 1 s; the broker was down from 1.5 s to 7 s: back at 8 s is fine
    # (it could not come back before 7 s), at 11 s it is late all the same.
    outage = [(1500, 7000)]
    timely = BrokerView(sightings=[Sighting("a"), Sighting("a", "c1", 1, 1000, 8000)])
    timely.outages = outage
    late = BrokerView(sightings=[Sighting("a"), Sighting("a", "c1", 1, 1000, 11000)])
    late.outages = outage
    answers = [_rejected("a", "INVALID_REQUEST")]
    assert not any("came back after" in p for p in _broker_problems(answers, timely))
    assert any("came back after 10.00 s" in p for p in _broker_problems(answers, late))
    # An outage after the copy was due holds nothing back.
    after = BrokerView(sightings=[Sighting("a"), Sighting("a", "c1", 1, 1000, 8000)])
    after.outages = [(2500, 7000)]
    assert any("came back after 7.00 s" in p for p in _broker_problems(answers, after))


def test_a_copy_due_while_the_queues_recover_may_wait_for_the_brokers_resend() -> None:
    # The broker was down from 1.5 s to 7 s; a copy sent at 8 s for 1 s expired while its
    # target queue was still recovering. With a 10 s dead-letter resend it may come back
    # by 7 + 15 (recovery) + 10 s; without one, or later than that, it is late.
    def view(arrived_ms: int, resend_s: float) -> BrokerView:
        broker = BrokerView(sightings=[Sighting("a"), Sighting("a", "c1", 1, 8000, arrived_ms)])
        broker.outages = [(1500, 7000)]
        broker.dead_letter_resend_s = resend_s
        return broker

    answers = [_rejected("a", "INVALID_REQUEST")]
    assert not any("came back after" in p for p in _broker_problems(answers, view(30000, 10)))
    assert any("came back after 22.00 s" in p for p in _broker_problems(answers, view(30000, 0)))
    assert any("came back after 28.00 s" in p for p in _broker_problems(answers, view(36000, 10)))
