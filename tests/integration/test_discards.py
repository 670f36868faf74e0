"""The Ledger port's units on both backends: first-delivery admission, and discards of
failed requests' objects (the ledger queue and the sweep against the real SeaweedFS,
including a store that cannot be reached)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from tests.fakes import GENEROUS
from tests.integration.s3_support import storage_settings
from zimage_pipeline.audit.chain import AuditLog
from zimage_pipeline.audit.verify import verify_chain
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.discards import DiscardQueue
from zimage_pipeline.ledger.jobs import JobStore
from zimage_pipeline.ledger.models import AuditEventRow, AuditRequest
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.policy import EffectivePolicy, QuotaLimits
from zimage_pipeline.ports import AuditRecord, Authorization, NewJob
from zimage_pipeline.settings import AuditSettings, DatabaseSettings, PriorityClass
from zimage_pipeline.storage import ObjectStore, image_key
from zimage_pipeline.wiring.discards import DiscardSweeper
from zimage_pipeline.wiring.ledger import LedgerUnits
from zimage_pipeline.wiring.outputs import S3Store

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Engine]:
    engine = create_ledger_engine(DatabaseSettings(url=ledger_url, pool_size=4))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def units(engine: Engine) -> tuple[LedgerUnits, DiscardQueue]:
    queue = DiscardQueue(engine)
    return LedgerUnits(
        engine,
        jobs=JobStore(engine),
        quota=QuotaLedger(engine),
        audit=AuditLog.from_settings(engine, AuditSettings()),
        discards=queue,
        lease_s=60,
    ), queue


def failed_job(engine: Engine, ledger: LedgerUnits, request_id: str, *, discard: bool) -> datetime:
    begin = JobStore(engine).begin(
        request_id=request_id,
        payload_sha256="0" * 64,
        principal="alice",
        on_behalf_of="alice",
        worker_id="w1",
    )
    ledger.conclude(
        request_id=request_id,
        status="failed",
        reason="STORAGE_FAILED",
        result={"request_id": request_id, "status": "failed"},
        release=False,
        audit=[],
        discard_outputs=discard,
    )
    return begin.created_at


def upload(store: ObjectStore, key: str) -> None:
    store.put_object(key, b"partial image", content_type="image/png", metadata={}, tags={})


def discarded_keys(engine: Engine, request_id: str) -> list[list[str]]:
    with engine.connect() as conn:
        payloads = conn.scalars(
            select(AuditEventRow.payload).where(
                AuditEventRow.request_id == request_id,
                AuditEventRow.event_type == "outputs_discarded",
            )
        )
        return [json.loads(p)["keys"] for p in payloads]


def test_sweep_deletes_the_request_objects_once_and_records_them(
    ledger: Engine, prefix: str
) -> None:
    units_, queue = units(ledger)
    store = ObjectStore(storage_settings())
    created = failed_job(ledger, units_, "r-partial", discard=True)
    failed_job(ledger, units_, "r-clean", discard=False)
    leftover = image_key(prefix, created, "r-partial", 0, "png")
    neighbour = image_key(prefix, created, "r-partial-2", 0, "png")  # same stem, other request
    upload(store, leftover)
    upload(store, neighbour)
    assert [p.request_id for p in queue.pending(limit=10)] == ["r-partial"]

    sweeper = DiscardSweeper(
        queue, store=S3Store(store, prefix=prefix, presign_ttl_s=0), ledger=units_, actor="t"
    )
    assert sweeper.sweep() == 1
    assert list(store.list_keys(prefix + "/")) == [neighbour]
    assert queue.pending(limit=10) == []
    assert discarded_keys(ledger, "r-partial") == [[leftover]]
    assert sweeper.sweep() == 0  # settled: nothing recorded twice
    assert discarded_keys(ledger, "r-partial") == [[leftover]]
    assert verify_chain(ledger).ok


def test_unreachable_store_keeps_the_discard_queued_with_the_error(ledger: Engine) -> None:
    units_, queue = units(ledger)
    failed_job(ledger, units_, "r-later", discard=True)
    down = ObjectStore(
        storage_settings(endpoint_url="http://127.0.0.1:9", connect_timeout_s=1, max_attempts=1)
    )
    sweeper = DiscardSweeper(
        queue, store=S3Store(down, prefix="p", presign_ttl_s=0), ledger=units_, actor="t"
    )
    assert sweeper.sweep() == 0
    (pending,) = queue.pending(limit=10)
    assert (pending.request_id, pending.attempts) == ("r-later", 1)
    assert discarded_keys(ledger, "r-later") == []


def audit_payloads(engine: Engine, request_id: str, event_type: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        payloads = conn.scalars(
            select(AuditEventRow.payload).where(
                AuditEventRow.request_id == request_id, AuditEventRow.event_type == event_type
            )
        )
        return [json.loads(p) for p in payloads]


def test_the_objects_of_an_id_with_colons_are_found_and_deleted(
    ledger: Engine, prefix: str
) -> None:
    """The discard lists the same encoded prefix the upload wrote to."""
    units_, queue = units(ledger)
    store = ObjectStore(storage_settings())
    created = failed_job(ledger, units_, "cms:asset:7", discard=True)
    leftover = image_key(prefix, created, "cms:asset:7", 0, "png")
    neighbour = image_key(prefix, created, "cms:asset:70", 0, "png")
    upload(store, leftover)
    upload(store, neighbour)
    sweeper = DiscardSweeper(
        queue, store=S3Store(store, prefix=prefix, presign_ttl_s=0), ledger=units_, actor="t"
    )
    assert sweeper.sweep() == 1
    assert list(store.list_keys(prefix + "/")) == [neighbour]
    assert discarded_keys(ledger, "cms:asset:7") == [[leftover]]


def test_a_discard_that_can_never_succeed_ends_recorded(ledger: Engine, prefix: str) -> None:
    """A queued discard whose keys cannot be built (an id no key can hold, as
    `cms:asset:42` was before ids were encoded) is ended with an audit event naming why,
    instead of failing every sweep forever; the discards behind it still run."""
    units_, queue = units(ledger)
    store = ObjectStore(storage_settings())
    JobStore(ledger).begin(
        request_id="legacy/id",  # not a request id: it has no key
        payload_sha256="0" * 64,
        principal="alice",
        on_behalf_of="alice",
        worker_id="w1",
    )
    units_.conclude(
        request_id="legacy/id",
        status="failed",
        reason="STORAGE_FAILED",
        result={"request_id": "legacy/id", "status": "failed"},
        release=False,
        audit=[AuditRecord("legacy/id", "failed", "w1", {"reason": "STORAGE_FAILED"})],
        discard_outputs=True,
    )
    created = failed_job(ledger, units_, "r-after", discard=True)
    upload(store, image_key(prefix, created, "r-after", 0, "png"))
    sweeper = DiscardSweeper(
        queue, store=S3Store(store, prefix=prefix, presign_ttl_s=0), ledger=units_, actor="t"
    )
    assert sweeper.sweep() == 2
    assert queue.pending(limit=10) == []
    (abandoned,) = audit_payloads(ledger, "legacy/id", "outputs_discard_abandoned")
    assert abandoned["cause"] == "INVALID_ID"
    assert "request id" in abandoned["message"]
    assert list(store.list_keys(prefix + "/")) == []  # the one behind it was deleted
    assert sweeper.sweep() == 0  # nothing left to retry, nothing recorded twice
    assert len(audit_payloads(ledger, "legacy/id", "outputs_discard_abandoned")) == 1
    with ledger.connect() as conn:
        index = conn.execute(
            select(AuditRequest.status, AuditRequest.reason).where(
                AuditRequest.request_id == "legacy/id"
            )
        ).one()
    assert tuple(index) == ("failed", "STORAGE_FAILED")  # still why the request failed
    assert verify_chain(ledger).ok


def authorization(user: str, images_per_day: int) -> Authorization:
    policy = EffectivePolicy(
        username=user,
        roles=("generator",),
        granted_by=(),
        max_pixels=GENEROUS.max_pixels,
        max_side=GENEROUS.max_side,
        max_images=GENEROUS.max_images,
        max_steps=GENEROUS.max_steps,
        allowed_formats=frozenset({"png"}),
        priority=PriorityClass.STANDARD,
        generate=True,
        delegate=False,
        user_quota=QuotaLimits(images_per_day=images_per_day),
        teams=(),
    )
    return Authorization(user, user, GENEROUS, {"roles": ["generator"]}, policy)


def test_a_first_delivery_is_admitted_in_one_transaction_or_not_at_all(ledger: Engine) -> None:
    """admit_new: a new request_id becomes a running job with its reservation and trail;
    a taken id or a quota refusal writes nothing (the worker then goes step by step)."""
    units_, _ = units(ledger)
    trail = [
        AuditRecord("n1", "received", "alice", {}),
        AuditRecord("n1", "authorized", "alice", {}),
    ]
    job = NewJob("n1", "0" * 64, "alice", "alice", "w1")
    auth = authorization("alice", images_per_day=3)
    assert units_.admit_new(job=job, authorization=auth, images=2, audit=trail)
    assert not units_.admit_new(job=job, authorization=auth, images=2, audit=trail)
    refused = NewJob("n2", "0" * 64, "alice", "alice", "w1")
    trail2 = [AuditRecord("n2", "received", "alice", {})]
    assert not units_.admit_new(job=refused, authorization=auth, images=2, audit=trail2)
    jobs = JobStore(ledger)
    first = jobs.get("n1")
    assert first is not None and (first.status.value, first.attempts) == ("running", 1)
    assert first.roles_snapshot == {"roles": ["generator"]}
    assert jobs.get("n2") is None
    quota = QuotaLedger(ledger)
    left = quota.remaining(user="alice", teams=(), user_limits=QuotaLimits(images_per_day=3))
    assert left.day == 1  # n1's two images held once, n2's nothing
    with ledger.connect() as conn:
        events = conn.execute(select(AuditEventRow.request_id, AuditEventRow.event_type)).all()
    assert sorted(map(tuple, events)) == [("n1", "authorized"), ("n1", "received")]
    assert verify_chain(ledger).ok
