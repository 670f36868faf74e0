"""One contract per port, run against the in-memory fake the unit tests use and the real
adapter on the real service, so the fakes cannot drift from what production does (a
fake that accepted an audit event type the ledger refuses hid a broken feature once).

Covered: the Store port (FakeStore / S3Store on SeaweedFS), the Audit port (FakeAudit /
the audit chain) and the Jobs port (FakeJobs / LedgerJobs), the last two on SQLite. Each implementation comes with a reader of
what it holds, which is all that differs between the two."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from tests.fakes import FakeAudit, FakeJobs, FakeStore
from tests.integration.s3_support import storage_settings
from zimage_pipeline.audit.chain import AuditLog
from zimage_pipeline.audit.errors import AuditError
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.jobs import JobStore
from zimage_pipeline.ledger.models import AuditEventRow
from zimage_pipeline.messages import CancelOutcome, GenerationRequest, ImageFormat
from zimage_pipeline.ports import (
    Audit,
    AuditRecord,
    BeginKind,
    EncodedDerived,
    EncodedImage,
    JobBegin,
    Jobs,
    Store,
)
from zimage_pipeline.settings import DatabaseSettings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import AuditAdapter
from zimage_pipeline.wiring.jobs import LedgerJobs
from zimage_pipeline.wiring.outputs import S3Store

pytestmark = pytest.mark.integration

CREATED = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def request(request_id: str) -> GenerationRequest:
    body = {"request_id": request_id, "on_behalf_of": "alice", "prompt": "a lighthouse"}
    return decode_request(json.dumps(body).encode())


def images(n: int, salt: str = "") -> list[EncodedImage]:
    return [
        EncodedImage(f"png {i}{salt} ".encode() * 500, ImageFormat.PNG, 64, 64, i) for i in range(n)
    ]


def thumb(source_index: int, salt: str = "") -> EncodedDerived:
    data = f"webp thumb {source_index}{salt} ".encode() * 50
    return EncodedDerived(source_index, "thumb", data, "webp", 32, 32, "renditions", {})


# -- the Store port ------------------------------------------------------------------------


@dataclass
class StoreUnderTest:
    store: Store
    read: Callable[[str], bytes | None]


@pytest.fixture(params=["fake", "s3"])
def store_under_test(request: pytest.FixtureRequest, prefix: str) -> StoreUnderTest:
    if request.param == "fake":
        fake = FakeStore()
        return StoreUnderTest(fake, fake.objects.get)
    objects = ObjectStore(storage_settings())

    def read(key: str) -> bytes | None:
        return objects.get_object(key) if key in set(objects.list_keys(key)) else None

    return StoreUnderTest(S3Store(objects, prefix=prefix, presign_ttl_s=0), read)


def test_store_returns_the_digest_of_what_it_holds_with_renditions_beside_their_source(
    store_under_test: StoreUnderTest,
) -> None:
    store, read = store_under_test.store, store_under_test.read
    pictures, derived = images(2), [thumb(0), thumb(1)]
    outputs = store.store(
        request=request("contract-1"),
        created_at=CREATED,
        images=pictures,
        audit_record={"request_id": "contract-1"},
        first_attempt=True,
        derived=derived,
    )
    assert len(outputs.images) == 2 and len(outputs.derived) == 2
    for ref, data in [
        *zip(outputs.images, [p.data for p in pictures], strict=True),
        *zip(outputs.derived, [d.data for d in derived], strict=True),
    ]:
        assert (ref.sha256, ref.size) == (hashlib.sha256(data).hexdigest(), len(data))
        assert read(ref.key) == data
    for ref, image in zip(outputs.derived, derived, strict=True):
        source_folder = outputs.images[image.source_index].key.rsplit("/", 1)[0]
        assert ref.key == f"{source_folder}/{image.source_index}/thumb.webp"
    assert read(outputs.audit_record_key) is not None


def test_a_second_attempt_keeps_what_the_first_stored(store_under_test: StoreUnderTest) -> None:
    """Identical content counts as success; other bytes under the request's own key
    (a re-signed manifest) are adopted, never overwritten."""
    store, read = store_under_test.store, store_under_test.read
    first = store.store(
        request=request("contract-2"),
        created_at=CREATED,
        images=images(1),
        audit_record={},
        first_attempt=True,
        derived=[thumb(0)],
    )
    again = store.store(
        request=request("contract-2"),
        created_at=CREATED,
        images=images(1, salt="resigned"),
        audit_record={},
        derived=[thumb(0, salt="resigned")],
    )
    assert [r.key for r in again.images] == [r.key for r in first.images]
    assert [r.sha256 for r in again.images] == [r.sha256 for r in first.images]
    assert [r.sha256 for r in again.derived] == [r.sha256 for r in first.derived]
    assert read(first.images[0].key) == images(1)[0].data


def test_discard_deletes_everything_of_the_request_and_nothing_else(
    store_under_test: StoreUnderTest,
) -> None:
    store, read = store_under_test.store, store_under_test.read
    kept = store.store(
        request=request("contract-kept"), created_at=CREATED, images=images(1), audit_record={}
    )
    gone = store.store(
        request=request("contract-gone"),
        created_at=CREATED,
        images=images(2),
        audit_record={},
        derived=[thumb(1)],
    )
    deleted = store.discard(request_id="contract-gone", created_at=CREATED)
    named = {r.key for r in [*gone.images, *gone.derived]} | {gone.audit_record_key}
    assert set(deleted) == named
    assert all(read(key) is None for key in named)
    assert read(kept.images[0].key) is not None
    assert store.discard(request_id="contract-gone", created_at=CREATED) == []


# -- the Audit port ------------------------------------------------------------------------


@dataclass
class AuditUnderTest:
    audit: Audit
    events: Callable[[str], list[str]]


@pytest.fixture(params=["fake", "ledger"])
def audit_under_test(request: pytest.FixtureRequest) -> Iterator[AuditUnderTest]:
    if request.param == "fake":
        fake = FakeAudit()
        yield AuditUnderTest(fake, lambda rid: [t for r, t in fake.events if r == rid])
        return
    url = str(request.getfixturevalue("sqlite_url"))
    engine = create_ledger_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)

    def events(rid: str) -> list[str]:
        with engine.connect() as conn:
            query = (
                select(AuditEventRow.event_type)
                .where(AuditEventRow.request_id == rid)
                .order_by(AuditEventRow.seq)
            )
            return list(conn.execute(query).scalars())

    yield AuditUnderTest(AuditAdapter(AuditLog(engine)), events)
    engine.dispose()


def test_audit_keeps_the_order_of_appends(audit_under_test: AuditUnderTest) -> None:
    audit, events = audit_under_test.audit, audit_under_test.events
    audit.append(request_id="c-1", event_type="received", actor="alice", payload={})
    audit.append_many(
        [
            AuditRecord("c-1", "authorized", "alice", {}),
            AuditRecord("c-1", "quota_reserved", "alice", {"images": 1}),
            AuditRecord("c-1", "postprocessed", "alice", {"renditions": []}),
        ]
    )
    assert events("c-1") == ["received", "authorized", "quota_reserved", "postprocessed"]


def test_audit_refuses_an_unknown_event_type_and_writes_nothing_of_the_batch(
    audit_under_test: AuditUnderTest,
) -> None:
    audit, events = audit_under_test.audit, audit_under_test.events
    with pytest.raises(AuditError):
        audit.append_many(
            [
                AuditRecord("c-2", "received", "alice", {}),
                AuditRecord("c-2", "made_up_event", "alice", {}),
            ]
        )
    assert events("c-2") == []


# -- the Jobs port -------------------------------------------------------------------------


@pytest.fixture(params=["fake", "ledger"])
def jobs_under_test(request: pytest.FixtureRequest) -> Iterator[Jobs]:
    """Jobs without a busy window (busy_s = 0): a second begin is a takeover."""
    if request.param == "fake":
        yield FakeJobs()
        return
    engine = create_ledger_engine(DatabaseSettings(url=str(request.getfixturevalue("sqlite_url"))))
    migrate.upgrade(engine)
    yield LedgerJobs(JobStore(engine), busy_s=0.0)
    engine.dispose()


def begin(jobs: Jobs, rid: str, *, principal: str = "cms", digest: str = "a" * 64) -> JobBegin:
    return jobs.begin(
        request_id=rid,
        payload_sha256=digest,
        principal=principal,
        on_behalf_of="alice",
        worker_id="w1",
    )


def test_a_new_id_is_new_and_held_by_its_publisher(jobs_under_test: Jobs) -> None:
    jobs = jobs_under_test
    first = begin(jobs, "j-1")
    assert (first.kind, first.attempts) == (BeginKind.NEW, 1)
    assert jobs.owner("j-1") == "cms" and jobs.owner("j-none") is None
    assert jobs.terminal_result("j-1") is None
    again = begin(jobs, "j-1")  # the same request, not finished: taken over
    assert (again.kind, again.attempts) == (BeginKind.NEW, 2)


def test_another_payload_conflicts_and_another_publisher_is_foreign(
    jobs_under_test: Jobs,
) -> None:
    jobs = jobs_under_test
    begin(jobs, "j-2")
    assert begin(jobs, "j-2", digest="b" * 64).kind is BeginKind.CONFLICT
    assert begin(jobs, "j-2", principal="pim").kind is BeginKind.FOREIGN
    assert jobs.owner("j-2") == "cms"  # nobody takes the id over


def test_a_cancel_before_arrival_answers_its_request_when_it_comes(jobs_under_test: Jobs) -> None:
    jobs = jobs_under_test
    decision = jobs.cancel("j-3", principal="cms")
    assert (decision.outcome, decision.key) == (CancelOutcome.PENDING, "j-3")
    arrived = begin(jobs, "j-3")
    assert arrived.kind is BeginKind.TERMINAL and arrived.cancelled_on_arrival
    assert arrived.result is not None and arrived.result["status"] == "cancelled"


def test_a_cancel_never_touches_another_publishers_request(jobs_under_test: Jobs) -> None:
    jobs = jobs_under_test
    begin(jobs, "j-4")
    decision = jobs.cancel("j-4", principal="pim")  # pim's own j-4, keyed apart
    assert decision.key != "j-4"
    assert begin(jobs, "j-4").kind is BeginKind.NEW  # cms's request goes on
    assert jobs.cancel("j-4", principal="cms").outcome is CancelOutcome.CANCELLED
    stopped = begin(jobs, "j-4")
    assert stopped.kind is BeginKind.TERMINAL and stopped.result is not None
    assert stopped.result["status"] == "cancelled"
