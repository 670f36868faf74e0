"""Case 8: a fuzzed stream of malformed messages mixed with good ones. Every bad one is
answered `rejected` with a reason that names what is wrong and its original is
dead-lettered with that reason; every good one succeeds; the queue never stalls."""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.poison import Poison, poison_stream
from tests.integration.fault_matrix.stack import (
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.worker_harness import Client, client, running_worker
from zimage_pipeline.broker import connect_robust
from zimage_pipeline.junk_audit import UNIDENTIFIED_PREFIX, JunkAuditBudget
from zimage_pipeline.settings import Settings

pytestmark = pytest.mark.integration

BAD = 26
GOOD = 8


async def publish_poison(alice: Client, poison: Poison) -> None:
    if not poison.anonymous:
        await alice.publish(poison.body, routing_key=poison.routing_key)
        return
    # No AMQP user_id at all: the broker lets it through, the worker must not.
    exchange = await alice.channel.get_exchange(alice.broker.requests_exchange, ensure=False)
    await exchange.publish(aio_pika.Message(poison.body), routing_key=poison.routing_key)


async def dead_letters(settings: Settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await connect_robust(settings.broker, name="fault-matrix dlq reader")
    async with connection:
        channel = await connection.channel()
        dlq = await channel.declare_queue(f"{settings.broker.requests_queue}.dlq", passive=True)
        found = []
        while (message := await dlq.get(fail=False, no_ack=True)) is not None:
            found.append(message)
    return found


def header(message: aio_pika.abc.AbstractIncomingMessage, name: str) -> str:
    value: Any = (message.headers or {}).get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_poison_stream_is_rejected_and_dead_lettered_good_ones_succeed(
    tiny_model: Path, postgres_url: str
) -> None:
    seed = int(os.environ.get("ZIMAGE_FUZZ_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    context = f"(fuzz seed {seed}; replay with ZIMAGE_FUZZ_SEED={seed})"
    poisons = poison_stream(rng, BAD)
    goods = [request(f"good-{i}", prompt=f"good request {i}") for i in range(GOOD)]
    stream: list[Poison | dict[str, Any]] = [*poisons, *goods]
    rng.shuffle(stream)

    settings = matrix_settings(tiny_model, postgres_url, worker={"max_buffered_per_principal": 64})
    good_ids = {g["request_id"] for g in goods}

    def rejected() -> list[dict[str, Any]]:
        return [r for r in tap.results if r["status"] == "rejected"]

    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports, worker_id="poisoned"),
        client(settings, "alice") as alice,
    ):
        for item in stream:
            if isinstance(item, Poison):
                await publish_poison(alice, item)
            else:
                await alice.publish(item)
        await tap.wait_for(*good_ids)
        await wait_until(lambda: len(rejected()) >= BAD, f"{BAD} rejections {context}")
        dead = await dead_letters(settings)

    assert {tap.first(g)["status"] for g in good_ids} == {"succeeded"}, context
    # Each bad message: rejected once, for its own reason, which names the problem.
    assert len(rejected()) == BAD, context
    by_body = {p.body: p for p in poisons}
    for result in rejected():
        assert result["reason"] in ("INVALID_REQUEST", "UNAUTHENTICATED_PUBLISHER"), result
        assert result.get("message"), result
    for n, poison in enumerate(poisons):
        # An id was readable: the answer names it (without speaking for it).
        for answer in (r for r in tap.results if r.get("claimed_request_id") == f"bad-{n}"):
            assert answer["request_id"] == "", (poison, answer, context)
            assert answer["reason"] == poison.reason, (poison, answer, context)
            assert poison.expect in answer["message"], (poison, answer, context)
    # ... and its original sits in the DLQ with that reason in its headers.
    assert Counter(m.body for m in dead) == Counter(p.body for p in poisons), context
    for message in dead:
        poison = by_body[message.body]
        assert header(message, "x-zimage-reason") == poison.reason, (poison, context)
        assert poison.expect in header(message, "x-zimage-error"), (
            poison,
            header(message, "x-zimage-error"),
            context,
        )
    world = assert_invariants(settings, tap, expected=good_ids)
    # Each answer (all without an id) left a `denied` event under the bad bytes' digest,
    # up to the publisher's budget of the minute (the rest are counted: junk_audit).
    unidentified = [e for e in world.events if e.request_id.startswith(UNIDENTIFIED_PREFIX)]
    without_id = [r for r in tap.results if r["request_id"] == ""]
    assert len(without_id) == BAD, context
    per_publisher = Counter(str(e.payload["principal"]) for e in unidentified)
    budget = JunkAuditBudget().per_window
    assert max(per_publisher.values()) == budget < BAD, (per_publisher, context)
    assert len(unidentified) < len(without_id), context
    digests = {hashlib.sha256(p.body).hexdigest() for p in poisons}
    assert {e.payload["body_sha256"] for e in unidentified} <= digests, context
    # No bad message claims an id (junk cannot squat one): the ledger holds the good only.
    assert set(world.jobs) == good_ids, context


async def test_a_malformed_message_reusing_a_known_id_does_not_contradict_its_outcome(
    tiny_model: Path, postgres_url: str
) -> None:
    settings = matrix_settings(tiny_model, postgres_url)
    rid = "victim-of-poison"
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports, worker_id="poisoned"),
        client(settings, "alice") as alice,
        client(settings, "bob") as bob,
    ):
        await alice.publish(request(rid))
        await tap.wait_for(rid)
        # Bob, who has nothing to do with alice's request, sends junk under its id.
        await bob.publish({**request(rid, on_behalf_of="bob"), "width": 72})
        # Bob is told INVALID_REQUEST without the id: it is alice's request's.
        junk = (await tap.wait_for(""))[""]
    assert (junk["status"], junk["reason"]) == ("rejected", "INVALID_REQUEST")
    assert "width" in junk["message"]
    assert [r["status"] for r in tap.of(rid)] == ["succeeded"]
    assert_invariants(settings, tap, expected={rid})
