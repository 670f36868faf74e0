"""Cases 14 to 16 (issue #14): one tenant cannot speak for, squat or wedge another's
requests, on the real stack (RabbitMQ, PostgreSQL ledger, slapd, SeaweedFS, tiny model).

14. Refusals never speak for someone else's id: a message reusing alice's finished id
    without a user_id, or from bob with another body, is answered without the id and
    leaves alice's trail and audit index untouched.
15. Cancels cannot squat ids: bob's cancel of an id nobody used is `pending` for bob only;
    alice's request under that id then runs; cancels are answered with their outcome.
16. Deeply nested JSON (under the size limit) is refused at decode, dead-lettered and
    answered, and the good request behind it in the same queue is served at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.stack import (
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.worker_harness import client, running_worker
from zimage_pipeline.audit.queries import AuditFilter, query_requests
from zimage_pipeline.cli import app
from zimage_pipeline.ids import scoped_key
from zimage_pipeline.ledger.models import AuditEventRow, Job

pytestmark = pytest.mark.integration


def trail(engine: object, request_id: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(
            select(AuditEventRow.seq, AuditEventRow.event_type)
            .where(AuditEventRow.request_id == request_id)
            .order_by(AuditEventRow.seq)
        )
        return [(row.seq, row.event_type) for row in rows]


async def test_refusals_never_speak_for_or_write_into_another_request(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    rid = "cms:asset:42"
    async with (
        case_stack(settings) as (tap, ledger),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports),
        client(settings, "alice") as alice,
        client(settings, "bob") as bob,
    ):
        await alice.publish(request(rid))
        assert (await alice.result_of(rid, wait_s=60))["status"] == "succeeded"
        await wait_until(lambda: "published" in ledger.event_types(rid), "the published event")
        before = trail(ledger.engine, rid)
        # The same body without a user_id (someone replaying it), and bob reusing the id.
        exchange = await alice.channel.get_exchange(settings.broker.requests_exchange)
        body = json.dumps({"priority": "standard", **request(rid)}).encode()
        await exchange.publish(aio_pika.Message(body), routing_key="standard")
        await bob.publish(request(rid, on_behalf_of="bob", prompt="another body"))
        bobs = await bob.next_result(wait_s=60)  # his own request, kept apart
        await tap.wait_for("")
        assert trail(ledger.engine, rid) == before  # nothing written into alice's trail
    assert (bobs["request_id"], bobs["status"], bobs["on_behalf_of"]) == (rid, "succeeded", "bob")
    anonymous = [r for r in tap.of("") if r["reason"] == "UNAUTHENTICATED_PUBLISHER"]
    assert [r["claimed_request_id"] for r in anonymous] == [rid]
    # The compliance view of alice's request still says what happened to it.
    listed = query_requests(ledger.engine, AuditFilter(reason="UNAUTHENTICATED_PUBLISHER"))
    assert rid not in {row.request_id for row in listed}
    world = assert_invariants(settings, tap, expected={rid, scoped_key(rid, "bob")})
    assert world.jobs[rid].status == "succeeded"


async def test_a_cancel_cannot_squat_an_id_and_every_cancel_is_answered(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    squatted, own = "sku:123", "alice-later"
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports),
        client(settings, "alice") as alice,
        client(settings, "bob") as bob,
    ):
        await bob.cancel(squatted)  # an id nobody used yet
        assert (await bob.next_cancel_answer())["outcome"] == "pending"
        await alice.publish(request(squatted))
        assert (await alice.result_of(squatted, wait_s=60))["status"] == "succeeded"
        # Bob's cancel of alice's id concerns bob's own request of that id, if one comes.
        for who, expected in ((alice, "too_late"), (bob, "pending")):
            await who.cancel(squatted)
            answer = await who.next_cancel_answer()
            assert (answer["request_id"], answer["outcome"]) == (squatted, expected)
        # Alice's own cancel ahead of her request is remembered for her.
        await alice.cancel(own)
        assert (await alice.next_cancel_answer())["outcome"] == "pending"
        await alice.publish(request(own))
        result = await alice.result_of(own, wait_s=60)
        await alice.publish({"request": "not a cancel"}, routing_key="cancel")
        invalid = await alice.next_cancel_answer()
    assert (result["status"], result["reason"]) == ("cancelled", "CANCELLED")
    assert invalid["outcome"] == "invalid" and "request_id" in invalid["message"]
    assert_invariants(settings, tap, expected={squatted, own})


async def test_deeply_nested_json_cannot_wedge_a_priority_queue(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(tiny_model, postgres_url, worker={"prefetch": 4})
    nested = b'{"request_id": "deep", "labels": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    assert len(nested) < settings.worker.max_body_bytes
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports) as running,
        client(settings, "alice") as alice,
    ):
        started = time.monotonic()
        for _ in range(8):  # enough to fill every prefetch slot of the bulk queue
            await alice.publish(nested, priority="bulk", routing_key="bulk")
        await alice.publish(request("after-the-junk", priority="bulk"), priority="bulk")
        good = (await tap.wait_for("after-the-junk", timeout_s=60))["after-the-junk"]
        waited_s = time.monotonic() - started
        await tap.wait_for("", count=8)
        refusals = tap.of("")
        assert running.worker.ready
    assert good["status"] == "succeeded" and waited_s < 30, waited_s
    for refusal in refusals:
        assert (refusal["status"], refusal["reason"]) == ("rejected", "INVALID_REQUEST")
        assert "nested 20001 levels deep" in refusal["message"]
    assert_invariants(settings, tap, expected={"after-the-junk"})


async def test_a_request_cannot_squat_an_id_each_publisher_has_its_own(
    tiny_model: Path, postgres_url: str
) -> None:
    """17. Bob uses an id first (a guessable CMS URN); alice's request under the same id
    still runs, kept apart under a scoped key, and each reads only their own answer."""
    settings = matrix_settings(tiny_model, postgres_url)
    rid = "cms:asset:7"
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports),
        client(settings, "alice") as alice,
        client(settings, "bob") as bob,
    ):
        await bob.publish(request(rid, on_behalf_of="bob", prompt="bob's"))
        assert (await bob.result_of(rid, wait_s=60))["status"] == "succeeded"
        await alice.publish(request(rid))
        mine = await alice.result_of(rid, wait_s=60)
        await alice.publish(request(rid))  # a duplicate: the same answer, nothing new
        again = await alice.result_of(rid, wait_s=60)
        await alice.cancel(rid)
        cancel = await alice.next_cancel_answer()
    assert (mine["request_id"], mine["status"]) == (rid, "succeeded")
    assert again["images"] == mine["images"]
    assert cancel["outcome"] == "too_late"
    key = scoped_key(rid, "alice")
    assert ledger_status(postgres_url, key) == "succeeded"
    assert all(quote(key, safe="") in image["key"] for image in mine["images"])
    world = assert_invariants(settings, tap, expected={rid, key})
    assert (world.jobs[rid].principal, world.jobs[key].principal) == ("bob", "alice")
    # Compliance finds each publisher's request by the id they gave.
    env = {"ZIMAGE_DATABASE__URL": postgres_url, "ZIMAGE_STORAGE__PREFIX": settings.storage.prefix}
    for publisher, user in (("alice", "alice"), ("bob", "bob")):
        shown = CliRunner().invoke(
            app, ["audit", "show", rid, "--publisher", publisher, "--format", "json"], env=env
        )
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["request"]["user"] == user


def ledger_status(url: str, key: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(Job.status).where(Job.request_id == key))
    finally:
        engine.dispose()


async def test_two_publishers_cancelling_one_unused_id_each_cancel_their_own(
    tiny_model: Path, postgres_url: str
) -> None:
    """15b. Bob and then alice cancel an id nobody used; each one's request under it,
    whichever comes first, ends cancelled: neither cancel displaces the other."""
    settings = matrix_settings(tiny_model, postgres_url)
    rid = "cms:asset:9"
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports),
        client(settings, "alice") as alice,
        client(settings, "bob") as bob,
    ):
        for who in (bob, alice):
            await who.cancel(rid)
            assert (await who.next_cancel_answer())["outcome"] == "pending"
        await alice.publish(request(rid))
        hers = await alice.result_of(rid, wait_s=60)
        await bob.publish(request(rid, on_behalf_of="bob"))
        his = await bob.result_of(rid, wait_s=60)
    for result, user in ((hers, "alice"), (his, "bob")):
        assert (result["request_id"], result["status"]) == (rid, "cancelled"), result
        assert result["on_behalf_of"] == user
    world = assert_invariants(settings, tap, expected={rid, scoped_key(rid, "bob")})
    assert world.jobs[rid].principal == "alice"
