"""The whole pipeline on the real services: RabbitMQ, slapd, SQLite/PostgreSQL ledger,
SeaweedFS and the tiny model, wired exactly as `zimage-pipeline worker` wires them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from tests.conftest import PROJECT_ROOT
from tests.integration.worker_harness import (
    built,
    client,
    client_password,
    delete_private_topology,
    private_settings,
    running_worker,
)
from zimage_pipeline.broker import connect_robust
from zimage_pipeline.engine.tiny import make_tiny_model
from zimage_pipeline.ids import request_id_of_segment
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.models import Job
from zimage_pipeline.ledger.txn import as_utc
from zimage_pipeline.provenance import read_provenance
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore, request_prefix
from zimage_pipeline.wiring import Wiring
from zimage_pipeline.worker.topology import declare_exchanges

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("e2e-model") / "tiny")


def e2e_settings(tiny_model: Path, ledger_url: str, **worker: Any) -> Settings:
    base = private_settings(**worker)
    ledger = create_engine(ledger_url)
    migrate.upgrade(ledger)
    ledger.dispose()
    return load_settings(
        broker=base.broker.model_dump(),
        worker=base.worker.model_dump(),
        database={"url": ledger_url},
        engine={"model_path": str(tiny_model), "device": "cpu"},
        storage={"prefix": f"e2e-{uuid.uuid4().hex[:8]}"},
    )


@pytest.fixture
async def stack(tiny_model: Path, ledger_url: str) -> AsyncIterator[tuple[Settings, Wiring]]:
    settings = e2e_settings(tiny_model, ledger_url)
    async with built(settings) as wiring:
        yield settings, wiring


def request(request_id: str, on_behalf_of: str, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "on_behalf_of": on_behalf_of,
        "prompt": "一只红狐狸 in the snow",
        "width": 128,
        "height": 128,
        "steps": 2,
        **fields,
    }


async def test_requests_end_in_the_expected_outcomes(stack: tuple[Settings, Wiring]) -> None:
    settings, wiring = stack
    async with (
        running_worker(settings, wiring.ports),
        client(settings, "alice") as alice,
        client(settings, "cms-publisher") as cms,
        client(settings, "carol") as carol,
        client(settings, "dave") as dave,
        client(settings, "bob") as bob,
    ):
        await alice.publish(
            request("e2e-alice", "alice", num_images=2, labels={"cms.asset_id": "A1"})
        )
        await cms.publish(request("e2e-hero", "alice", format="webp"), priority="interactive")
        await bob.publish(request("e2e-bob-for-alice", "alice"))
        await carol.publish(request("e2e-carol", "carol"))
        await dave.publish(request("e2e-dave", "dave"))
        await alice.publish(request("e2e-too-big", "alice", num_images=8))
        # Each publisher reads the results of what it published, and only those.
        publishers = {
            "e2e-alice": alice,
            "e2e-hero": cms,
            "e2e-bob-for-alice": bob,
            "e2e-carol": carol,
            "e2e-dave": dave,
            "e2e-too-big": alice,
        }
        results = {rid: await who.result_of(rid, wait_s=120) for rid, who in publishers.items()}

    outcome = {rid: (r["status"], r.get("reason")) for rid, r in results.items()}
    assert outcome == {
        "e2e-alice": ("succeeded", None),
        "e2e-hero": ("succeeded", None),
        "e2e-bob-for-alice": ("rejected", "DELEGATION_NOT_ALLOWED"),
        "e2e-carol": ("rejected", "NOT_AUTHORIZED"),
        "e2e-dave": ("rejected", "ACCOUNT_DISABLED"),
        "e2e-too-big": ("rejected", "POLICY_VIOLATION"),
    }
    alice_result = results["e2e-alice"]
    assert [i["seed"] for i in alice_result["images"]] == [
        alice_result["images"][0]["seed"],
        alice_result["images"][0]["seed"] + 1,
    ]
    assert alice_result["quota_remaining"]["day"] == 100 - 2 - 1  # editor: 100 a day; hero 1

    # The stored images are what the result says, and carry their provenance.
    store = ObjectStore(settings.storage)
    for rid in ("e2e-alice", "e2e-hero"):
        for image in results[rid]["images"]:
            data = store.get_object(image["key"])
            assert hashlib.sha256(data).hexdigest() == image["sha256"]
            report = read_provenance(data)
            assert report.marked_as_ai, report
            assert report.xmp["zimage:RequestId"] == rid
            assert report.xmp["zimage:Seed"] == str(image["seed"])
    assert results["e2e-hero"]["images"][0]["format"] == "webp"

    # The ledger agrees: one terminal row per request.
    engine = create_engine(settings.database.url)
    with engine.connect() as conn:
        rows = {j.request_id: j.status for j in conn.execute(select(Job.request_id, Job.status))}
    engine.dispose()
    assert {rid: rows[rid] for rid in outcome} == {rid: s for rid, (s, _) in outcome.items()}


def _worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ZIMAGE_BROKER__REQUESTS_EXCHANGE": settings.broker.requests_exchange,
            "ZIMAGE_BROKER__REQUESTS_QUEUE": settings.broker.requests_queue,
            "ZIMAGE_BROKER__RESULTS_EXCHANGE": settings.broker.results_exchange,
            "ZIMAGE_BROKER__DEAD_LETTER_EXCHANGE": settings.broker.dead_letter_exchange,
            "ZIMAGE_DATABASE__URL": settings.database.url,
            "ZIMAGE_ENGINE__MODEL_PATH": settings.engine.model_path,
            "ZIMAGE_ENGINE__DEVICE": "cpu",
            "ZIMAGE_STORAGE__PREFIX": settings.storage.prefix,
            "ZIMAGE_WORKER__HTTP_PORT": "0",
            "ZIMAGE_LOGGING__JSON_LOGS": "true",
        }
    )
    return env


EXIT_NOT_PUBLISHED = 3


def submit_cli(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zimage_pipeline.cli", "submit", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def submit_once_a_worker_is_up(
    env: dict[str, str], args: list[str], *, within_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """`zimage-pipeline submit ARGS`, again while the broker queued nothing: a starting
    worker declares the exchanges and then binds its queues, and a request published in
    between is refused with exit 3 (nothing queued, safe to resend under the same id)."""
    deadline = time.monotonic() + within_s
    while True:
        submitted = submit_cli(env, args)
        if submitted.returncode != EXIT_NOT_PUBLISHED or time.monotonic() > deadline:
            return submitted
        time.sleep(2)


async def test_submit_says_why_nothing_was_queued_when_no_worker_declared_the_queues(
    tiny_model: Path, sqlite_url: str
) -> None:
    """Before any worker ran, the exchange is missing; with the exchanges but no queue
    bound, the broker returns the message. Either way: exit 3, one clear error line,
    no traceback."""
    settings = e2e_settings(tiny_model, sqlite_url)
    env = _worker_env(settings)
    env.update(
        {"ZIMAGE_CLIENT__USERNAME": "alice", "ZIMAGE_CLIENT__PASSWORD": client_password("alice")}
    )
    args = ["--prompt", "a quiet harbour", "--request-id", "early-1", "--no-wait"]
    try:
        missing = submit_cli(env, args)
        assert missing.returncode == EXIT_NOT_PUBLISHED, missing.stderr
        assert "request early-1 was not queued" in missing.stderr
        assert "start a worker" in missing.stderr and "Traceback" not in missing.stderr

        connection = await connect_robust(settings.broker, name="test-exchanges-only")
        async with connection:
            await declare_exchanges(await connection.channel(), settings.broker)
        unbound = submit_cli(env, [*args[:-1], "--priority", "bulk"])
        assert unbound.returncode == EXIT_NOT_PUBLISHED, unbound.stderr
        assert "has no queue for routing key 'bulk'" in unbound.stderr
        assert "Traceback" not in unbound.stderr
    finally:
        await delete_private_topology(settings)


@pytest.fixture
def worker_process(
    tiny_model: Path, sqlite_url: str
) -> Iterator[tuple[Settings, subprocess.Popen[str]]]:
    settings = e2e_settings(tiny_model, sqlite_url)
    process = subprocess.Popen(
        [sys.executable, "-m", "zimage_pipeline.cli", "worker"],
        cwd=PROJECT_ROOT,
        env=_worker_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield settings, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        import asyncio

        asyncio.run(delete_private_topology(settings))


def test_cli_worker_and_submit_then_sigterm_exits_zero(
    worker_process: tuple[Settings, subprocess.Popen[str]],
) -> None:
    settings, process = worker_process
    env = _worker_env(settings)
    env.update(
        {"ZIMAGE_CLIENT__USERNAME": "alice", "ZIMAGE_CLIENT__PASSWORD": client_password("alice")}
    )
    submitted = submit_once_a_worker_is_up(
        env,
        [
            "--prompt",
            "a quiet harbour",
            "--width",
            "128",
            "--height",
            "128",
            "--steps",
            "2",
            "--request-id",
            "cli-1",
            "--label",
            "pim.sku=SKU-42",
        ],
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert '"status": "succeeded"' in submitted.stdout
    assert "SKU-42" in submitted.stdout

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "a quiet harbour" not in output  # prompts stay out of the logs
    assert '"request_id": "cli-1"' in output  # job lines carry the request id


class CountingEngine:
    """The real engine, counting how many images it was asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.images = 0

    @property
    def identity(self) -> Any:
        return self.inner.identity

    def generate(self, specs: Any) -> Any:
        self.images += len(specs)
        time.sleep(0.5)  # long enough for the duplicate to arrive while this one runs
        return self.inner.generate(specs)


async def test_same_request_to_two_workers_at_once_generates_once(
    stack: tuple[Settings, Wiring],
) -> None:
    """Given two workers, when the same request is delivered twice at the same moment,
    then it is generated and charged once and both deliveries get the same answer."""
    from dataclasses import replace

    settings, wiring = stack
    counting = CountingEngine(wiring.ports.engine)
    ports = replace(wiring.ports, engine=counting)
    async with (
        running_worker(settings, ports, worker_id="worker-a"),
        running_worker(settings, ports, worker_id="worker-b"),
        client(settings, "alice") as alice,
    ):
        await alice.publish(request("twice-1", "alice"))
        await alice.publish(request("twice-1", "alice"))
        first = await alice.result_of("twice-1", wait_s=60)
        second = await alice.result_of("twice-1", wait_s=60)
    assert first["status"] == "succeeded"
    # The same answer, each echoing its own message's id (aio-pika sets a message_id).
    assert first.pop("correlation_id") != second.pop("correlation_id")
    assert first == second
    assert counting.images == 1
    assert first["quota_remaining"]["day"] == 100 - 1


async def test_an_id_with_colons_is_stored_under_its_encoded_key(
    stack: tuple[Settings, Wiring],
) -> None:
    """Issue 14, section 2: `cms:asset:42` (a CMS URN) passed the schema, then storage
    refused it; the request was generated five times and ended ILLEGAL_TRANSITION. Now
    it succeeds, its objects under `cms%3Aasset%3A42`, a key that decodes to the id."""
    settings, wiring = stack
    rid = "cms:asset:42"
    async with running_worker(settings, wiring.ports), client(settings, "alice") as alice:
        await alice.publish(request(rid, "alice", num_images=2))
        result = await alice.result_of(rid, wait_s=120)
    assert (result["status"], result.get("reason")) == ("succeeded", None), result

    store = ObjectStore(settings.storage)
    folder = result["audit_record_key"].rsplit("/", 1)[0]
    assert request_id_of_segment(folder.rsplit("/", 1)[1]) == rid
    assert folder.endswith("/cms%3Aasset%3A42")
    for image in result["images"]:
        data = store.get_object(image["key"])
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        assert read_provenance(data).xmp["zimage:RequestId"] == rid  # the id, not its key
    record = json.loads(store.get_object(result["audit_record_key"]))
    assert record["request"]["request_id"] == rid
    assert [o["key"] for o in record["objects"]] == [i["key"] for i in result["images"]]
    # Listing (what a discard deletes) finds exactly these objects under that prefix.
    engine = create_engine(settings.database.url)
    with engine.connect() as conn:
        job = conn.execute(select(Job.status, Job.created_at).where(Job.request_id == rid)).one()
    engine.dispose()
    assert job.status == "succeeded"
    prefix = request_prefix(settings.storage.prefix, as_utc(job.created_at), rid)
    assert prefix == folder
    expected = sorted([*(i["key"] for i in result["images"]), result["audit_record_key"]])
    assert sorted(store.list_keys(prefix + "/")) == expected
