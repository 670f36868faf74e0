"""One contract per port, run against the in-memory fake the unit tests use and the real
adapter on the real service, so the fakes cannot drift from what production does (a
fake that accepted an audit event type the ledger refuses hid a broken feature once).

Covered: the Engine port (FakeEngine / the engine adapter on the tiny model, CPU), the
Encoder port (FakeEncoder / ProvenanceEncoder), the Ledger port (FakeLedger / LedgerUnits on SQLite), the Authorizer port (FakeAuthorizer / the directory with the shipped policy on
slapd), the Store port (FakeStore / S3Store on SeaweedFS), the Objects port (FakeObjects /
ObjectStore on SeaweedFS: the anchors' and the tools' access), the Audit port (FakeAudit /
the audit chain) and the Jobs port (FakeJobs / LedgerJobs), the last two on SQLite. Each implementation comes with a reader of
what it holds, which is all that differs between the two."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import select

from tests.conftest import require_env, require_port
from tests.fakes import (
    GENEROUS,
    FakeAudit,
    FakeAuthorizer,
    FakeEncoder,
    FakeEngine,
    FakeJobs,
    FakeObjects,
    FakeStore,
    fake_ledger,
)
from tests.integration.s3_support import storage_settings
from zimage_pipeline.audit.chain import AuditLog
from zimage_pipeline.audit.errors import AuditError
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.directory import LdapDirectory
from zimage_pipeline.engine import load_engine
from zimage_pipeline.engine.config import EngineConfig
from zimage_pipeline.engine.tiny import make_tiny_model
from zimage_pipeline.errors import Disposition, ZImageError
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.discards import DiscardQueue
from zimage_pipeline.ledger.jobs import JobStore
from zimage_pipeline.ledger.models import AuditEventRow
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.messages import CancelOutcome, GenerationRequest, ImageFormat, TemplateRef
from zimage_pipeline.policy import EffectivePolicy, QuotaLimits
from zimage_pipeline.ports import (
    Audit,
    AuditRecord,
    Authorization,
    Authorizer,
    BeginKind,
    EncodedDerived,
    EncodedImage,
    Encoder,
    Engine,
    ImageSpec,
    JobBegin,
    Jobs,
    Ledger,
    ModelIdentity,
    NewJob,
    Objects,
    QuotaLeft,
    RawImage,
    Store,
)
from zimage_pipeline.settings import DatabaseSettings, PriorityClass, load_settings
from zimage_pipeline.storage import ObjectConflictError, ObjectStore, StorageError
from zimage_pipeline.storage.errors import ObjectNotFoundError, ObjectTooLargeError
from zimage_pipeline.wiring import AuditAdapter
from zimage_pipeline.wiring.identity import DirectoryAuthorizer
from zimage_pipeline.wiring.jobs import LedgerJobs
from zimage_pipeline.wiring.ledger import LedgerUnits
from zimage_pipeline.wiring.outputs import EngineAdapter, ProvenanceEncoder, S3Store

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


def ledger_events(engine: SqlEngine) -> Callable[[str], list[str]]:
    """A request's audit event types in the ledger, in chain order."""

    def events(rid: str) -> list[str]:
        with engine.connect() as conn:
            query = (
                select(AuditEventRow.event_type)
                .where(AuditEventRow.request_id == rid)
                .order_by(AuditEventRow.seq)
            )
            return list(conn.execute(query).scalars())

    return events


@pytest.fixture(params=["fake", "ledger"])
def audit_under_test(request: pytest.FixtureRequest) -> Iterator[AuditUnderTest]:
    if request.param == "fake":
        fake = FakeAudit()
        yield AuditUnderTest(fake, lambda rid: [t for r, t in fake.events if r == rid])
        return
    url = str(request.getfixturevalue("sqlite_url"))
    engine = create_ledger_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)

    yield AuditUnderTest(AuditAdapter(AuditLog(engine)), ledger_events(engine))
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


@pytest.fixture(params=["fake", "ledger"])
def busy_jobs_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[float], Jobs]]:
    """Jobs with a busy window, made on demand (the window is the test's)."""
    engines = []

    def make(busy_s: float) -> Jobs:
        if request.param == "fake":
            return FakeJobs(busy_s=busy_s)
        url = str(request.getfixturevalue("sqlite_url"))
        engine = create_ledger_engine(DatabaseSettings(url=url))
        migrate.upgrade(engine)
        engines.append(engine)
        return LedgerJobs(JobStore(engine), busy_s=busy_s)

    yield make
    for engine in engines:
        engine.dispose()


def begin(
    jobs: Jobs,
    rid: str,
    *,
    principal: str = "cms",
    digest: str = "a" * 64,
    worker_id: str = "w1",
) -> JobBegin:
    return jobs.begin(
        request_id=rid,
        payload_sha256=digest,
        principal=principal,
        on_behalf_of="alice",
        worker_id=worker_id,
    )


def test_a_job_another_worker_is_on_is_busy_until_its_window_passes(
    busy_jobs_factory: Callable[[float], Jobs],
) -> None:
    # A duplicate delivered to a second worker while the first generates must wait
    # (BUSY), not generate twice; the first worker's own redelivery takes it again.
    jobs = busy_jobs_factory(60.0)
    assert begin(jobs, "b-1", worker_id="w1").kind is BeginKind.NEW
    busy = begin(jobs, "b-1", worker_id="w2")
    assert (busy.kind, busy.attempts) == (BeginKind.BUSY, 1)
    assert begin(jobs, "b-1", worker_id="w1").kind is BeginKind.NEW
    # Past the window the first worker is presumed dead: the second takes it over.
    short = busy_jobs_factory(0.3)
    assert begin(short, "b-2", worker_id="w1").kind is BeginKind.NEW
    assert begin(short, "b-2", worker_id="w2").kind is BeginKind.BUSY
    time.sleep(0.5)
    taken = begin(short, "b-2", worker_id="w2")
    assert (taken.kind, taken.attempts) == (BeginKind.NEW, 2)


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


# -- the Authorizer port -------------------------------------------------------------------


@pytest.fixture(params=["fake", "ldap"])
def authorizer_under_test(request: pytest.FixtureRequest) -> Iterator[Authorizer]:
    """The fake as the unit tests configure it, and the directory with the shipped
    policy on the seed directory: alice and bob are users, cms-publisher delegates."""
    if request.param == "fake":
        yield FakeAuthorizer(
            users={"alice": GENEROUS, "bob": GENEROUS}, delegators={"cms-publisher"}
        )
        return
    require_env("ZIMAGE_DIRECTORY__BIND_PASSWORD_FILE")
    require_port("slapd", 3389)
    settings = load_settings()
    directory = LdapDirectory(settings.directory)
    yield DirectoryAuthorizer(directory, settings.policy)
    directory.close()


def refusal(authorizer: Authorizer, principal: str, on_behalf_of: str) -> str:
    """The reason of a refusal, which must be a REJECT (answered, never retried)."""
    with pytest.raises(ZImageError) as refused:
        authorizer.authorize(principal=principal, on_behalf_of=on_behalf_of)
    assert refused.value.disposition is Disposition.REJECT, refused.value
    return refused.value.reason


def test_a_user_for_herself_in_any_case_is_herself(authorizer_under_test: Authorizer) -> None:
    for asked in ("alice", "ALICE"):
        auth = authorizer_under_test.authorize(principal="alice", on_behalf_of=asked)
        assert (auth.subject, auth.principal) == ("alice", "alice")  # the directory's spelling


def test_only_a_delegator_acts_for_someone_else(authorizer_under_test: Authorizer) -> None:
    auth = authorizer_under_test.authorize(principal="cms-publisher", on_behalf_of="ALICE")
    assert (auth.subject, auth.principal) == ("alice", "cms-publisher")
    assert refusal(authorizer_under_test, "bob", "alice") == "DELEGATION_NOT_ALLOWED"


def test_unknown_accounts_are_refused_publisher_first(authorizer_under_test: Authorizer) -> None:
    assert refusal(authorizer_under_test, "cms-publisher", "nobody-here") == "UNKNOWN_USER"
    assert refusal(authorizer_under_test, "nobody-here", "nobody-here") == "UNKNOWN_USER"
    # An unknown publisher is unknown before it is a non-delegator.
    assert refusal(authorizer_under_test, "nobody-here", "alice") == "UNKNOWN_USER"


# -- the Ledger port -----------------------------------------------------------------------

DAILY = 3  # the subject's images per day in both implementations


@dataclass
class LedgerUnderTest:
    ledger: Ledger
    jobs: Jobs
    authorization: Authorization  # alice, DAILY images a day
    events: Callable[[str], list[str]]  # a request's audit event types, in order
    status: Callable[[str], str | None]  # its job's status


@pytest.fixture(params=["fake", "ledger"])
def ledger_under_test(request: pytest.FixtureRequest) -> Iterator[LedgerUnderTest]:
    policy = EffectivePolicy(
        username="alice",
        roles=("generator",),
        granted_by=(),
        max_pixels=1 << 20,
        max_side=1024,
        max_images=4,
        max_steps=8,
        allowed_formats=frozenset({"png"}),
        priority=PriorityClass.STANDARD,
        generate=True,
        delegate=False,
        user_quota=QuotaLimits(images_per_day=DAILY),
        teams=(),
    )
    authorization = Authorization(
        subject="alice",
        principal="alice",
        limits=GENEROUS,
        roles_snapshot={"subject": policy.to_snapshot()},
        quota_subjects=policy,  # what DirectoryAuthorizer hands the ledger
    )
    if request.param == "fake":
        fake = fake_ledger(daily=DAILY)
        yield LedgerUnderTest(
            fake,
            fake.jobs,
            authorization,
            lambda rid: [t for r, t in fake.audit.events if r == rid],
            lambda rid: fake.jobs.rows[rid]["status"] if rid in fake.jobs.rows else None,
        )
        return
    url = str(request.getfixturevalue("sqlite_url"))
    engine = create_ledger_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)
    store = JobStore(engine)
    units = LedgerUnits(
        engine,
        jobs=store,
        quota=QuotaLedger(engine),
        audit=AuditLog(engine),
        discards=DiscardQueue(engine),
        lease_s=600,
    )

    def status(rid: str) -> str | None:
        job = store.get(rid)
        return None if job is None else str(job.status)

    yield LedgerUnderTest(
        units, LedgerJobs(store, busy_s=0.0), authorization, ledger_events(engine), status
    )
    engine.dispose()


def new_job(rid: str) -> NewJob:
    return NewJob(
        request_id=rid,
        payload_sha256="a" * 64,
        principal="alice",
        on_behalf_of="alice",
        worker_id="w1",
    )


def event(rid: str, event_type: str) -> AuditRecord:
    return AuditRecord(rid, event_type, "alice", {})


def test_a_request_is_admitted_charged_once_and_ends_with_its_result(
    ledger_under_test: LedgerUnderTest,
) -> None:
    t = ledger_under_test
    assert t.ledger.admit_new(
        job=new_job("l-1"),
        authorization=t.authorization,
        images=2,
        audit=[event("l-1", "received"), event("l-1", "quota_reserved")],
    )
    assert t.status("l-1") == "running"
    assert not t.ledger.admit_new(  # the id is taken: the caller goes step by step
        job=new_job("l-1"), authorization=t.authorization, images=2, audit=[]
    )
    assert t.ledger.heartbeat("l-1", worker_id="w1")
    left: list[QuotaLeft] = []

    def result_of(quota: QuotaLeft) -> dict[str, Any]:
        left.append(quota)
        return {"request_id": "l-1", "status": "succeeded"}

    t.ledger.complete(
        request_id="l-1",
        authorization=t.authorization,
        images=2,
        audit=[event("l-1", "quota_committed")],
        result_of=result_of,
    )
    assert [q.day for q in left] == [DAILY - 2]  # what is left after this charge
    assert t.status("l-1") == "succeeded"
    assert t.jobs.terminal_result("l-1") == {"request_id": "l-1", "status": "succeeded"}
    assert not t.ledger.heartbeat("l-1", worker_id="w1")  # finished: nothing to keep alive
    assert t.events("l-1") == ["received", "quota_reserved", "quota_committed"]


def test_a_takeover_is_told_the_template_its_admitted_attempt_used(
    ledger_under_test: LedgerUnderTest,
) -> None:
    """The worker of an admitted attempt died: the next begin takes the job over and
    hands back the template version recorded at admission (the service renders it
    again); a job admitted without a template hands back none."""
    t = ledger_under_test
    used = TemplateRef(id="ecommerce-hero", version=3, sha256="c" * 64)
    for rid, template in (("l-t1", used), ("l-t2", None)):
        assert t.ledger.admit_new(
            job=new_job(rid), authorization=t.authorization, images=1, audit=[], template=template
        )
        again = t.jobs.begin(
            request_id=rid,
            payload_sha256="a" * 64,
            principal="alice",
            on_behalf_of="alice",
            worker_id="w2",
        )
        assert (again.kind, again.attempts, again.template) == (BeginKind.NEW, 2, template)


def test_a_quota_refusal_writes_nothing(ledger_under_test: LedgerUnderTest) -> None:
    t = ledger_under_test
    assert not t.ledger.admit_new(
        job=new_job("l-2"), authorization=t.authorization, images=DAILY + 1, audit=[]
    )
    assert t.status("l-2") is None and t.jobs.owner("l-2") is None
    # Step by step (what the caller does next), the refusal names the quota.
    assert (
        t.jobs.begin(
            request_id="l-2",
            payload_sha256="a" * 64,
            principal="alice",
            on_behalf_of="alice",
            worker_id="w1",
        ).kind
        is BeginKind.NEW
    )
    with pytest.raises(ZImageError) as refused:
        t.ledger.admit(
            request_id="l-2",
            authorization=t.authorization,
            images=DAILY + 1,
            audit=[event("l-2", "quota_reserved")],
        )
    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert t.status("l-2") == "received" and t.events("l-2") == []


def test_a_release_gives_the_images_back_and_is_recorded_only_when_held(
    ledger_under_test: LedgerUnderTest,
) -> None:
    t = ledger_under_test
    assert t.ledger.admit_new(
        job=new_job("l-3"), authorization=t.authorization, images=DAILY, audit=[]
    )
    failed = {"request_id": "l-3", "status": "failed"}
    t.ledger.conclude(
        request_id="l-3",
        status="failed",
        reason="GENERATION_FAILED",
        result=failed,
        release=True,
        audit=[event("l-3", "failed")],
        release_event=event("l-3", "quota_released"),
    )
    assert t.status("l-3") == "failed" and t.jobs.terminal_result("l-3") == failed
    assert t.events("l-3") == ["failed", "quota_released"]
    # The whole day is free again: a request of DAILY images fits.
    assert t.ledger.admit_new(
        job=new_job("l-4"), authorization=t.authorization, images=DAILY, audit=[]
    )
    # A job that never held a reservation: no release is claimed in its trail.
    t.jobs.begin(
        request_id="l-5",
        payload_sha256="a" * 64,
        principal="alice",
        on_behalf_of="alice",
        worker_id="w1",
    )
    t.ledger.conclude(
        request_id="l-5",
        status="rejected",
        reason="INVALID_REQUEST",
        result={"request_id": "l-5", "status": "rejected"},
        release=True,
        audit=[event("l-5", "denied")],
        release_event=event("l-5", "quota_released"),
    )
    assert t.events("l-5") == ["denied"]


# -- the Engine and Encoder ports -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The real engine adapter on the tiny random-weight model, on the CPU (loaded once)."""
    model = make_tiny_model(tmp_path_factory.mktemp("contract-model") / "tiny")
    settings = load_settings(engine={"model_path": str(model), "device": "cpu"})
    return EngineAdapter(load_engine(EngineConfig.from_settings(settings.engine)))


@pytest.fixture(params=["fake", "tiny"])
def engine_under_test(request: pytest.FixtureRequest) -> Engine:
    if request.param == "fake":
        return FakeEngine()
    engine: Engine = request.getfixturevalue("tiny_engine")
    return engine


def spec(seed: int, width: int = 64, height: int = 80) -> ImageSpec:
    return ImageSpec(
        prompt="a lighthouse",
        negative_prompt=None,
        width=width,
        height=height,
        steps=2,
        guidance_scale=0.0,
        seed=seed,
    )


def test_the_engine_answers_each_spec_in_order_at_its_size(
    engine_under_test: Engine,
) -> None:
    made = engine_under_test.generate([spec(7), spec(8)])
    assert [(m.seed, m.width, m.height, m.index) for m in made] == [(7, 64, 80, 0), (8, 64, 80, 1)]
    assert [m.pixels.size for m in made] == [(64, 80), (64, 80)]
    assert all(m.pixels.mode == "RGB" for m in made)
    identity = engine_under_test.identity
    assert identity.name and identity.weights_sha256 and len(identity.weights_sha256) == 64


def test_a_size_the_model_cannot_make_is_refused(engine_under_test: Engine) -> None:
    with pytest.raises(ZImageError, match="multiple of 16"):
        engine_under_test.generate([spec(7, height=72)])


def test_the_same_seed_gives_the_same_pixels(engine_under_test: Engine) -> None:
    first, again = (engine_under_test.generate([spec(11)])[0] for _ in range(2))
    assert first.pixels.tobytes() == again.pixels.tobytes()


@pytest.fixture(params=["fake", "provenance"])
def encoder_under_test(request: pytest.FixtureRequest) -> Encoder:
    if request.param == "fake":
        return FakeEncoder()
    return ProvenanceEncoder(creator_tool="zimage-pipeline", c2pa=None)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_the_encoder_writes_the_requests_format_at_the_images_size(
    encoder_under_test: Encoder, fmt: str
) -> None:
    body = {"request_id": "e-1", "on_behalf_of": "alice", "prompt": "x", "format": fmt}
    asked = decode_request(json.dumps(body).encode())
    raw = RawImage(Image.new("RGB", (64, 48), (200, 30, 30)), seed=5, width=64, height=48)
    encoded = encoder_under_test.encode(
        raw, request=asked, model=ModelIdentity("m", None, "0" * 64), created_at=CREATED
    )
    assert (encoded.format, encoded.width, encoded.height, encoded.seed) == (
        ImageFormat(fmt),
        64,
        48,
        5,
    )
    with Image.open(io.BytesIO(encoded.data)) as decoded:
        assert (decoded.format, decoded.size) == ({"jpeg": "JPEG"}.get(fmt, fmt.upper()), (64, 48))


# -- the Objects port ----------------------------------------------------------------------


@dataclass
class ObjectsUnderTest:
    objects: Objects
    bucket: str


@pytest.fixture(params=["fake", "s3"])
def objects_under_test(request: pytest.FixtureRequest) -> ObjectsUnderTest:
    settings = storage_settings()
    if request.param == "fake":
        fake = FakeObjects(default_bucket=settings.bucket)
        fake.buckets[settings.audit_bucket] = {}
        fake.buckets[settings.bucket] = {}
        return ObjectsUnderTest(fake, settings.audit_bucket)
    return ObjectsUnderTest(ObjectStore(settings), settings.audit_bucket)


def test_objects_are_written_once_and_read_back(
    objects_under_test: ObjectsUnderTest, prefix: str
) -> None:
    objects, bucket = objects_under_test.objects, objects_under_test.bucket
    key = f"{prefix}/anchors/0001.json"
    first = objects.put_json(key, {"b": 1, "a": "é"}, bucket=bucket, tags={"kind": "t"})
    again = objects.put_json(key, {"a": "é", "b": 1}, bucket=bucket)  # same canonical bytes
    stored = objects.get_object(key, bucket=bucket)
    assert stored == '{"a":"é","b":1}'.encode()
    assert (first.sha256, first.size) == (hashlib.sha256(stored).hexdigest(), len(stored))
    assert again.sha256 == first.sha256
    with pytest.raises(ObjectConflictError):
        objects.put_json(key, {"a": "other"}, bucket=bucket)
    assert objects.get_object(key, bucket=bucket) == stored  # never overwritten


def test_objects_list_in_order_and_by_level(
    objects_under_test: ObjectsUnderTest, prefix: str
) -> None:
    objects, bucket = objects_under_test.objects, objects_under_test.bucket
    for key in ["b/2.json", "a.json", "b/1.json", "c/d/3.json"]:
        objects.put_json(f"{prefix}/{key}", {"k": key}, bucket=bucket)
    assert list(objects.list_keys(f"{prefix}/b/", bucket=bucket)) == [
        f"{prefix}/b/1.json",
        f"{prefix}/b/2.json",
    ]
    keys, children = objects.list_children(f"{prefix}/", bucket=bucket)
    assert keys == [f"{prefix}/a.json"]
    assert sorted(children) == [f"{prefix}/b/", f"{prefix}/c/"]
    assert list(objects.list_keys(f"{prefix}/none/", bucket=bucket)) == []


def test_objects_name_what_is_missing(objects_under_test: ObjectsUnderTest, prefix: str) -> None:
    objects, bucket = objects_under_test.objects, objects_under_test.bucket
    with pytest.raises(ObjectNotFoundError, match=r"missing\.json"):
        objects.get_object(f"{prefix}/missing.json", bucket=bucket)
    key = f"{prefix}/sized.json"
    objects.put_json(key, {"pad": "x" * 100}, bucket=bucket)
    assert len(objects.get_object(key, bucket=bucket, max_bytes=200)) > 100
    with pytest.raises(ObjectTooLargeError):  # refused, not read
        objects.get_object(key, bucket=bucket, max_bytes=50)
    objects.check_buckets([bucket])
    with pytest.raises(StorageError, match="no-such-bucket-zimage"):
        objects.check_buckets([bucket, "no-such-bucket-zimage"])
