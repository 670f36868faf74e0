"""Tenants on the real RabbitMQ, driven the way integrators drive it: with pika, another
AMQP client library than the worker's own (aio-pika).

Results are routed under the account that published the request
(`result.<publisher>.<status>[.<reason>]`) and `scripts/services.sh` gives every client
account topic permissions on `zimage.results` that let it bind only `result.<itself>.*`.
So bob cannot read cms-publisher's results, whatever he binds.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.integration.test_worker_amqp import make_ports, request
from tests.integration.worker_harness import (
    client_password,
    delete_private_topology,
    private_settings,
    running_worker,
)
from zimage_pipeline.settings import Settings

pytestmark = pytest.mark.integration

# The exchange services.sh sets topic permissions on (they name one exchange exactly).
SHARED_RESULTS = "zimage.results"


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    private = private_settings()
    shared = private.model_copy(
        update={"broker": private.broker.model_copy(update={"results_exchange": SHARED_RESULTS})}
    )
    yield shared
    # Never delete the shared results exchange: only this test's own names.
    await delete_private_topology(private)


@contextmanager
def pika_channel(settings: Settings, user: str) -> Iterator[Any]:
    parameters = pika.ConnectionParameters(
        host=settings.broker.host,
        port=settings.broker.port,
        credentials=pika.PlainCredentials(user, client_password(user)),
    )
    connection = pika.BlockingConnection(parameters)
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def bind_refused(settings: Settings, user: str, binding_key: str) -> bool:
    """Whether the broker refuses `user` a queue bound to the results with this key."""
    with pika_channel(settings, user) as channel:
        queue = channel.queue_declare("", exclusive=True).method.queue
        try:
            channel.queue_bind(queue, SHARED_RESULTS, routing_key=binding_key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 403, exc  # ACCESS_REFUSED
            return True
        return False


def publish_and_collect(
    settings: Settings, *, publisher: str, reader: str, body: dict[str, Any], wait_s: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`publisher` publishes `body` (pika, publisher confirms, mandatory); both accounts
    bind their own results first. Returns what each of them received within `wait_s`
    after the publisher's answer (or until `wait_s` without one)."""
    received: dict[str, list[dict[str, Any]]] = {publisher: [], reader: []}
    with pika_channel(settings, publisher) as pub, pika_channel(settings, reader) as other:
        queues = {}
        for user, channel in ((publisher, pub), (reader, other)):
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, SHARED_RESULTS, routing_key=f"result.{user}.#")
            queues[user] = (channel, queue)
        pub.confirm_delivery()
        pub.basic_publish(
            settings.broker.requests_exchange,
            "standard",
            json.dumps({"priority": "standard", **body}).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                user_id=publisher,
                message_id=body["request_id"],
            ),
            mandatory=True,
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for user, (channel, queue) in queues.items():
                method, _, payload = channel.basic_get(queue, auto_ack=True)
                if method is not None:
                    received[user].append(json.loads(payload))
            if received[publisher] and time.monotonic() > deadline - wait_s + 2:
                break  # answered, and the other tenant had two more seconds to see it
            time.sleep(0.1)
    return received[publisher], received[reader]


async def test_bob_cannot_read_cms_publishers_results(settings: Settings) -> None:
    rid = f"tenant-{uuid.uuid4().hex[:8]}"
    async with running_worker(settings, make_ports()):  # declares the results exchange
        # The broker refuses the bindings that would show bob other tenants' results.
        for key in ("result.#", "result.*.succeeded", "result.cms-publisher.#", "#"):
            assert await asyncio.to_thread(bind_refused, settings, "bob", key), key
        assert not await asyncio.to_thread(bind_refused, settings, "bob", "result.bob.#")
        mine, bobs = await asyncio.to_thread(
            publish_and_collect,
            settings,
            publisher="cms-publisher",
            reader="bob",
            body=request(rid, on_behalf_of="alice"),
            wait_s=30,
        )
    assert [(r["request_id"], r["status"]) for r in mine] == [(rid, "succeeded")]
    assert bobs == []


async def test_pika_publisher_gets_its_answer_and_a_refusal_names_the_field(
    settings: Settings,
) -> None:
    """The contract as an integrator sees it through pika: a good request and a bad one,
    each answered once, under the publisher's own routing key."""
    ports = make_ports()
    good, bad = (f"pika-{uuid.uuid4().hex[:8]}" for _ in range(2))
    async with running_worker(settings, replace(ports)):
        answered, _ = await asyncio.to_thread(
            publish_and_collect,
            settings,
            publisher="alice",
            reader="bob",
            body=request(good),
            wait_s=30,
        )
        refused, _ = await asyncio.to_thread(
            publish_and_collect,
            settings,
            publisher="alice",
            reader="bob",
            body=request(bad, width=100),
            wait_s=30,
        )
    assert [r["status"] for r in answered] == ["succeeded"]
    assert [(r["status"], r["reason"]) for r in refused] == [("rejected", "INVALID_REQUEST")]
    assert "width" in refused[0]["message"]


def queue_refused(user: str, settings: Settings, action: str, queue: str) -> bool:
    """Whether the broker refuses `user` (403) to `action` the queue named `queue`."""
    with pika_channel(settings, user) as channel:
        try:
            if action == "get":
                channel.basic_get(queue, auto_ack=True)
            elif action == "peek":
                channel.queue_declare(queue, passive=True)
            elif action == "declare":
                channel.queue_declare(queue, durable=True)
            elif action == "delete":
                channel.queue_delete(queue)
            else:
                raise AssertionError(action)
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 403, exc  # ACCESS_REFUSED
            return True
        return False


async def test_a_tenants_durable_results_queue_is_its_own(settings: Settings) -> None:
    """A CMS keeps its results in a durable queue named under its account
    (`<account>.<name>`). Found by a probe: every client could read, inspect and delete
    any other client's named queue (one shared `amq_.*` pattern), i.e. read another
    tenant's results by the queue's name. Now the broker refuses all of it."""
    mine = f"alice.results-{uuid.uuid4().hex[:8]}"
    async with running_worker(settings, make_ports()):  # declares the results exchange
        with pika_channel(settings, "alice") as alice:
            alice.queue_declare(mine, durable=True)
            alice.queue_bind(mine, SHARED_RESULTS, routing_key="result.alice.#")
            try:
                # (A passive declare needs no permission in RabbitMQ: it tells whoever
                # knows a name that the queue exists and how many messages it holds,
                # never their contents.)
                for action in ("get", "delete"):
                    assert await asyncio.to_thread(queue_refused, "bob", settings, action, mine)
                assert await asyncio.to_thread(
                    queue_refused, "bob", settings, "declare", "alice.squatted"
                )
                assert not await asyncio.to_thread(queue_refused, "alice", settings, "peek", mine)
            finally:
                alice.queue_delete(mine)
        # bob's own named queues work as alice's do.
        bobs = f"bob.results-{uuid.uuid4().hex[:8]}"
        assert not await asyncio.to_thread(queue_refused, "bob", settings, "declare", bobs)
        assert not await asyncio.to_thread(queue_refused, "bob", settings, "delete", bobs)
