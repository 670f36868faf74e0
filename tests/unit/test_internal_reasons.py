"""How a request ends when something goes wrong after it started running, and what a
client is told about internal errors (issue 14, section 2: a storage refusal during a
running job asked the ledger for running -> rejected; the ledger's ILLEGAL_TRANSITION
was retried five times and then published as the request's reason)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest

from tests.fakes import (
    GENEROUS,
    FakeAudit,
    FakeAuthorizer,
    FakeEncoder,
    FakeEngine,
    FakeJobs,
    FakeLedger,
    FakeQuota,
    FakeStore,
)
from zimage_pipeline.engine.errors import InvalidGenerationSpec
from zimage_pipeline.errors import (
    INTERNAL_ERROR,
    INTERNAL_MESSAGE,
    Disposition,
    RequestRejectedError,
    ZImageError,
    client_facing,
)
from zimage_pipeline.ledger.jobs import ALLOWED, IllegalTransitionError, JobNotFoundError
from zimage_pipeline.ledger.models import JobStatus
from zimage_pipeline.messages import GenerationRequest, Status
from zimage_pipeline.ports import (
    AuditRecord,
    EncodedDerived,
    EncodedImage,
    ImageSpec,
    RawImage,
    StoredOutputs,
)
from zimage_pipeline.results import rejected
from zimage_pipeline.service import Ports, RequestService, ServiceConfig
from zimage_pipeline.storage import InvalidKeyError

POOL = ThreadPoolExecutor(max_workers=2)


class StateMachineJobs(FakeJobs):
    """FakeJobs that ends a job only along the ledger's own state machine, as JobStore
    does (the plain fake accepts any move)."""

    def finish(
        self, request_id: str, status: str, *, reason: str | None, result: Mapping[str, Any]
    ) -> None:
        current, target = JobStatus(self.rows[request_id]["status"]), JobStatus(status)
        if current is not target and target not in ALLOWED.get(current, frozenset()):
            raise IllegalTransitionError(
                f"job {request_id!r} cannot go from {current.value} to {target.value}"
            )
        super().finish(request_id, status, reason=reason, result=result)
        self.rows[request_id]["reason"] = reason


class RefusingEngine(FakeEngine):
    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        raise InvalidGenerationSpec("this model cannot make that size")


class KeylessStore(FakeStore):
    """A store that cannot build the request's keys: what `cms:asset:42` met."""

    def store(
        self,
        *,
        request: GenerationRequest,
        created_at: datetime,
        images: Sequence[EncodedImage],
        audit_record: Mapping[str, Any],
        first_attempt: bool = False,
        derived: Sequence[EncodedDerived] = (),
    ) -> StoredOutputs:
        raise InvalidKeyError("not a safe id for an object key")


class SpyLedger(FakeLedger):
    """Keeps what each `conclude` was asked to record."""

    def __init__(self) -> None:
        super().__init__(StateMachineJobs(), FakeQuota(daily=3), FakeAudit())
        self.concluded: list[dict[str, Any]] = []

    def conclude(self, **kwargs: Any) -> None:
        self.concluded.append(kwargs)
        super().conclude(**kwargs)


def make(**overrides: Any) -> tuple[RequestService, SpyLedger]:
    ledger = SpyLedger()
    ports = Ports(
        jobs=ledger.jobs,
        authorizer=FakeAuthorizer(users={"alice": GENEROUS}),
        ledger=ledger,
        engine=FakeEngine(),
        encoder=FakeEncoder(),
        store=FakeStore(),
        audit=ledger.audit,
    )
    for name, value in overrides.items():
        setattr(ports, name, value)
    service = RequestService(
        ports, ServiceConfig(worker_id="w1"), gpu_executor=POOL, io_executor=POOL
    )
    return service, ledger


def body(request_id: str = "cms:asset:42") -> bytes:
    document = {"request_id": request_id, "on_behalf_of": "alice", "prompt": "a cat"}
    return json.dumps({**document, "width": 64, "height": 64}).encode()


@pytest.mark.parametrize(
    ("overrides", "reason", "discard"),
    [
        ({"engine": RefusingEngine()}, "INVALID_GENERATION_PARAMETERS", False),
        # Every valid request id forms a key (ids.py), so storage refusing one is a
        # defect of ours: outside the closed list of reasons, a client sees INTERNAL_ERROR.
        ({"store": KeylessStore()}, "INTERNAL_ERROR", True),
    ],
)
async def test_a_refusal_once_running_ends_failed_with_its_reason(
    overrides: dict[str, Any], reason: str, discard: bool
) -> None:
    service, ledger = make(**overrides)
    outcome = await service.handle(body(), principal="alice")
    assert (outcome.result.status, outcome.result.reason) == (Status.FAILED, reason)
    row = ledger.jobs.rows["cms:asset:42"]
    assert (row["status"], row["reason"]) == ("failed", reason)
    assert ledger.quota.reserved == {}  # released
    assert ledger.concluded[-1]["discard_outputs"] is discard  # the upload had begun
    events = [e for _, e in ledger.audit.events]
    assert "denied" not in events and "failed" in events


async def test_a_refusal_before_running_is_still_rejected() -> None:
    # bob is a known account that may not act for alice.
    service, ledger = make(authorizer=FakeAuthorizer(users={"alice": GENEROUS, "bob": GENEROUS}))
    outcome = await service.handle(body(), principal="bob")
    assert (outcome.result.status, outcome.result.reason) == (
        Status.REJECTED,
        "DELEGATION_NOT_ALLOWED",
    )
    assert ledger.jobs.rows["cms:asset:42"]["status"] == "rejected"


async def test_an_internal_error_after_the_retries_is_published_as_internal_error() -> None:
    service, ledger = make()
    # Earlier attempts left the job running (each failed to end it).
    ledger.jobs.begin(
        request_id="cms:asset:42",
        payload_sha256="0" * 64,
        principal="alice",
        on_behalf_of="alice",
        worker_id="w0",
    )
    ledger.jobs.mark("cms:asset:42", "running")
    error = IllegalTransitionError("job 'cms:asset:42' cannot go from running to rejected")
    outcome = await service.release_after_retries(body(), principal="alice", error=error)
    result = outcome.result
    assert (result.status, result.reason) == (Status.FAILED, INTERNAL_ERROR)
    assert result.message == INTERNAL_MESSAGE
    assert "running" not in result.to_json_bytes().decode()
    (concluded,) = ledger.concluded
    assert concluded["reason"] == INTERNAL_ERROR  # the ledger says what the result says
    (failed,) = [r for r in concluded["audit"] if isinstance(r, AuditRecord)]
    # ... and the trail keeps the internal cause for operators.
    assert failed.payload["reason"] == INTERNAL_ERROR
    assert failed.payload["internal_reason"] == "ILLEGAL_TRANSITION"
    assert "cannot go from running to rejected" in failed.payload["message"]


class UnexpectedError(ZImageError):
    """As the worker wraps an unexpected exception: no reason of its own."""

    disposition = Disposition.RETRY


@pytest.mark.parametrize(
    "error",
    [
        IllegalTransitionError("cannot go from running to rejected"),
        JobNotFoundError("no job for request 'x'"),
        UnexpectedError("KeyError: 'jobs.status'"),
    ],
)
def test_internal_errors_never_reach_a_result(error: ZImageError) -> None:
    assert client_facing(error) == (INTERNAL_ERROR, INTERNAL_MESSAGE)
    result = rejected("r1", error, status=Status.FAILED)
    assert (result.reason, result.message) == (INTERNAL_ERROR, INTERNAL_MESSAGE)


def test_errors_meant_for_clients_are_told_as_they_are() -> None:
    error = RequestRejectedError("over the limit", reason="POLICY_VIOLATION")
    assert client_facing(error) == ("POLICY_VIOLATION", "over the limit")
    # INVALID_ID is not on the closed list (reasons.py): no valid request id can cause it.
    assert client_facing(InvalidKeyError("bad id"))[0] == "INTERNAL_ERROR"
