"""The audit chain on SQLite and PostgreSQL: appends, concurrency, tampering named by verify."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from zimage_pipeline.audit import (
    EVENT_TYPES,
    AuditError,
    AuditFilter,
    AuditLog,
    apply_prompt_retention,
    query_requests,
    request_story,
    verify_chain,
)
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ports import AuditRecord
from zimage_pipeline.settings import AuditSettings, DatabaseSettings, PromptRetention

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    engine = create_ledger_engine(DatabaseSettings(url=ledger_url, pool_size=8))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def story(log: AuditLog, request_id: str, *, user: str = "alice", at: datetime = T0) -> None:
    """A successful request's events, the way the worker records them."""
    steps: list[tuple[str, dict[str, object]]] = [
        (
            "received",
            {
                "user": user,
                "principal": "cms-publisher",
                "prompt": f"a red bicycle for {request_id}",
                "labels": {"cms_asset": f"A-{request_id}", "sku": "SKU-1"},
            },
        ),
        ("authorized", {"groups": ["editors", "zimage-generators"], "roles": ["editor"]}),
        ("quota_reserved", {"images": 1}),
        ("generated", {"model": "Z-Image-Turbo@abc", "seeds": [7], "timings": {"gpu_s": 1.5}}),
        ("stored", {"keys": [f"zimage/{request_id}/0.png"], "sha256": ["00" * 32]}),
        ("quota_committed", {"images": 1}),
        ("published", {}),
    ]
    for i, (event_type, payload) in enumerate(steps):
        log.append(
            request_id=request_id,
            event_type=event_type,
            actor="worker-1",
            payload=payload,
            at=at + timedelta(seconds=i),
        )


def sql(engine: Engine, statement: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement))


def test_intact_chain_verifies(engine: Engine) -> None:
    log = AuditLog(engine)
    story(log, "req-1")
    story(log, "req-2", user="bob")
    report = verify_chain(engine)
    assert report.ok, report.problems
    assert report.events_checked == 14
    assert report.head_seq == 14


def test_edited_row_is_named(engine: Engine) -> None:
    log = AuditLog(engine)
    story(log, "req-1")
    sql(engine, "UPDATE audit_events SET payload = replace(payload, '[7]', '[8]') WHERE seq = 4")

    first = verify_chain(engine).first_broken

    assert first is not None
    assert (first.seq, first.problem, first.request_id, first.event_type) == (
        4,
        "edited",
        "req-1",
        "generated",
    )


def test_edited_actor_or_time_is_named(engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    sql(engine, "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 2")
    first = verify_chain(engine).first_broken
    assert first is not None and (first.seq, first.problem) == (2, "edited")


def test_deleted_row_is_named(engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    sql(engine, "DELETE FROM audit_events WHERE seq = 3")

    first = verify_chain(engine).first_broken

    assert first is not None
    assert (first.seq, first.problem) == (3, "missing")


def test_reordered_rows_are_named(engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    # Swap positions 3 and 4 (through a free seq, the primary key).
    sql(engine, "UPDATE audit_events SET seq = -1 WHERE seq = 3")
    sql(engine, "UPDATE audit_events SET seq = 3 WHERE seq = 4")
    sql(engine, "UPDATE audit_events SET seq = 4 WHERE seq = -1")

    first = verify_chain(engine).first_broken

    assert first is not None
    assert (first.seq, first.problem, first.event_type) == (3, "broken_link", "generated")


def test_cut_off_tail_is_detected_by_the_head(engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    sql(engine, "DELETE FROM audit_events WHERE seq = 7")
    first = verify_chain(engine).first_broken
    assert first is not None and (first.seq, first.problem) == (7, "truncated")


def test_retained_prompt_edit_is_named(engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    sql(engine, 'UPDATE audit_events SET prompt_text = \'{"prompt":"other"}\' WHERE seq = 1')
    first = verify_chain(engine).first_broken
    assert first is not None and (first.seq, first.problem) == (1, "prompt_edited")


def test_append_joins_the_callers_transaction(engine: Engine) -> None:
    log = AuditLog(engine)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        log.append(
            request_id="req-1", event_type="received", actor="w", payload={}, connection=conn
        )
        raise RuntimeError("the quota commit failed: everything rolls back")
    assert verify_chain(engine).head_seq == 0
    event = log.append(request_id="req-1", event_type="received", actor="w", payload={})
    assert event.seq == 1


def test_unknown_event_type_is_refused(engine: Engine) -> None:
    with pytest.raises(AuditError):
        AuditLog(engine).append(request_id="r", event_type="deleted", actor="w", payload={})


def test_every_event_type_the_worker_writes_is_accepted(engine: Engine) -> None:
    """The service and its helpers name event types in code; the chain refuses any not
    in EVENT_TYPES, so one missing there fails every request that writes it."""
    from zimage_pipeline.junk_audit import SUMMARY_EVENT

    log = AuditLog(engine)
    written = sorted(EVENT_TYPES)
    log.append_many([AuditRecord("types-1", t, "worker", {"n": 1}) for t in written])
    log.append(request_id="types-2", event_type=SUMMARY_EVENT, actor="worker", payload={})
    assert verify_chain(engine).ok


def test_concurrent_writers_keep_one_chain(engine: Engine) -> None:
    """Given several workers appending at once, the chain has no gap, fork or duplicate."""
    log = AuditLog(engine)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                log.append(
                    request_id=f"req-{n}-{i}", event_type="received", actor=f"w{n}", payload={}
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors
    report = verify_chain(engine)
    assert report.ok, report.problems
    assert report.events_checked == report.head_seq == 90


def test_prompt_hash_only_policy_never_stores_text(engine: Engine) -> None:
    story(AuditLog(engine, prompt_retention=PromptRetention.HASH), "req-1")
    summary, events = request_story(engine, "req-1")
    assert summary is not None and summary.prompt is None and summary.prompt_sha256
    assert events[0].prompts is None
    assert "prompt" not in events[0].payload and "prompt_sha256" in events[0].payload
    assert verify_chain(engine).ok


def test_redaction_keeps_the_chain_verifiable(engine: Engine) -> None:
    story(AuditLog(engine, prompt_retention=PromptRetention.REDACT), "req-1")
    by_prompt = AuditFilter(prompt="RED BICYCLE")
    assert [s.request_id for s in query_requests(engine, by_prompt)] == ["req-1"]

    policy = AuditSettings(prompt_retention=PromptRetention.REDACT, prompt_redact_after_days=30)
    assert apply_prompt_retention(engine, policy, now=T0 + timedelta(days=29)) == 0
    assert apply_prompt_retention(engine, policy, now=T0 + timedelta(days=31)) == 1

    assert verify_chain(engine).ok
    assert list(query_requests(engine, by_prompt)) == []
    summary, _ = request_story(engine, "req-1")
    assert summary is not None and summary.prompt is None and summary.prompt_sha256


def test_queries_answer_the_compliance_questions(engine: Engine) -> None:
    log = AuditLog(engine)
    story(log, "req-1", user="alice", at=T0)
    story(log, "req-2", user="bob", at=T0 + timedelta(hours=1))
    log.append(request_id="req-3", event_type="received", actor="w", payload={"user": "carol"})
    log.append(
        request_id="req-3",
        event_type="denied",
        actor="w",
        payload={"reason": "QUOTA_EXCEEDED", "groups": ["interns"]},
    )
    log.append(request_id="req-3", event_type="published", actor="w", payload={})

    def ids(**filters: object) -> list[str]:
        return [s.request_id for s in query_requests(engine, AuditFilter(**filters))]  # type: ignore[arg-type]

    assert ids() == ["req-3", "req-2", "req-1"]  # newest first
    assert ids(user="bob") == ["req-2"]
    assert ids(group="editors") == ["req-2", "req-1"]
    assert ids(status="denied", reason="QUOTA_EXCEEDED") == ["req-3"]  # denial stays visible
    assert ids(status="published") == ["req-2", "req-1"]
    assert ids(model="Z-Image-Turbo@abc", since=T0 + timedelta(minutes=30)) == ["req-2"]
    assert ids(until=T0 + timedelta(minutes=30)) == ["req-1"]
    assert ids(labels=(("cms_asset", "A-req-2"),)) == ["req-2"]
    assert ids(labels=((None, "SKU-1"),), limit=1) == ["req-2"]
    assert ids(prompt="bicycle for req-1") == ["req-1"]
    assert ids(prompt="%") == []  # LIKE wildcards are matched literally

    summary, events = request_story(engine, "req-1")
    assert summary is not None
    assert summary.groups == ("editors", "zimage-generators")
    assert summary.labels == {"cms_asset": ["A-req-1"], "sku": ["SKU-1"]}
    assert [e.event_type for e in events] == [
        "received",
        "authorized",
        "quota_reserved",
        "generated",
        "stored",
        "quota_committed",
        "published",
    ]
    assert events[0].prompts == {"prompt": "a red bicycle for req-1"}


STORIES: list[list[tuple[str, dict[str, object]]]] = [
    [
        ("received", {"user": "ann", "prompt": "a kite", "labels": {"sku": "S-1"}}),
        ("authorized", {"principal": "cms", "groups": ["editors"]}),
        ("quota_reserved", {"images": 1}),
        ("generated", {"model": {"name": "Z", "revision": "r1"}}),
        ("stored", {"keys": ["k"]}),
        ("quota_committed", {"images": 1}),
        ("published", {"status": "succeeded"}),
    ],
    [  # a denial stays the status through the later publish and release
        ("received", {"user": "bob"}),
        ("denied", {"reason": "QUOTA_EXCEEDED", "groups": ["interns", "editors"]}),
        ("published", {"reason": "QUOTA_EXCEEDED"}),
        ("quota_released", {"images": 2}),
    ],
    [  # a later sticky status replaces an earlier one
        ("received", {"user": "cy", "labels": {"sku": "S-2", "asset": "A"}}),
        ("failed", {"reason": "STORAGE_FAILED"}),
        ("expired", {"reason": "EXPIRED"}),
        ("published", {}),
    ],
    [("quota_limit_set", {"user": "dee"}), ("quota_granted", {"user": "dee"})],
]


@pytest.mark.parametrize("story_events", STORIES)
def test_index_is_the_same_however_the_events_are_batched(
    engine: Engine, story_events: list[tuple[str, dict[str, object]]]
) -> None:
    """The index upsert merges a batch into an existing row in SQL; the row must be what
    folding the events one by one gives, for every way of splitting them into appends."""
    log = AuditLog(engine)
    n = len(story_events)
    story = uuid.uuid4().hex[:8]
    splits = {
        f"{story}-one-by-one": [1] * n,
        f"{story}-one-batch": [n],
        f"{story}-first-then-rest": [1, n - 1],
        f"{story}-pairs": [2] * (n // 2) + [1] * (n % 2),
    }
    for request_id, sizes in splits.items():
        done = 0
        for size in sizes:
            batch = story_events[done : done + size]
            log.append_many([AuditRecord(request_id, t, "w", p) for t, p in batch], at=T0)
            done += size
    rows = set()
    with engine.connect() as conn:
        for request_id in splits:
            row = conn.execute(
                text(
                    "select subject, principal, model, status, reason, events, prompt_sha256,"
                    " prompt_text from audit_requests where request_id = :r"
                ),
                {"r": request_id},
            ).one()
            groups = conn.execute(
                text("select group_name from audit_request_groups where request_id = :r"),
                {"r": request_id},
            ).scalars()
            labels = conn.execute(
                text("select key, value from audit_request_labels where request_id = :r"),
                {"r": request_id},
            )
            rows.add((tuple(row), tuple(sorted(groups)), tuple(sorted(map(tuple, labels)))))
    assert len(rows) == 1, rows
    (index, _, _), *_ = rows
    assert index[5] == n
    expected = {"ann": "published", "bob": "denied", "cy": "expired", "dee": "quota_limit_set"}
    assert index[3] == expected[index[0]]
