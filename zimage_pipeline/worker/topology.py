"""RabbitMQ topology, declared (idempotently) by every worker and by `submit`.

    requests exchange (direct) --interactive--> <queue>.interactive  (quorum)
                                --standard-----> <queue>.standard     (quorum)
                                --bulk---------> <queue>.bulk         (quorum)
                                --cancel-------> <queue>.control      (quorum)
    retry exchange (headers, zimage-delay=<N>s) -> <queue>.retry.<N>s (quorum, TTL N s,
                                   at-least-once dead-lettering)
                                   --dead-letter, original routing key--> requests exchange
    dead-letter exchange (fanout) -> <queue>.dlq (quorum)
    results exchange (topic, routing key result.<publisher>.<status>[.<reason>]; clients
        may bind only their own publisher word: RabbitMQ topic permissions)
        alternate exchange -> <results>.unrouted (quorum): a result nobody bound for is kept

Priorities: RabbitMQ 3.x quorum queues have no message priorities, so each priority
class is its own queue and the worker's scheduler serves interactive first.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from zimage_pipeline.messages import Priority
from zimage_pipeline.settings import BrokerSettings, WorkerSettings

CANCEL_ROUTING_KEY = "cancel"
# The header the retry exchange routes on. Not `x-` prefixed: a headers exchange ignores
# headers whose names begin with `x-` when matching, so a binding on such a header matches
# every message and each republished copy landed in every delay queue at once.
DELAY_HEADER = "zimage-delay"
# The header name of releases before that was found: their bindings are removed at
# declaration, since one left in place would still match every message.
LEGACY_DELAY_HEADER = "x-zimage-delay"


@dataclass(frozen=True, slots=True)
class Topology:
    requests: AbstractExchange
    retry: AbstractExchange
    dead_letter: AbstractExchange
    results: AbstractExchange
    priority_queues: dict[Priority, AbstractQueue]
    control_queue: AbstractQueue
    dlq: AbstractQueue


def retry_queue_name(broker: BrokerSettings, delay_s: int) -> str:
    return f"{broker.requests_queue}.retry.{delay_s}s"


# The routing-key word of a message whose publisher is unknown (no user_id): `%` not
# followed by two hex digits, which `publisher_word` never produces for a real account.
ANONYMOUS_WORD = "%anonymous"


def publisher_word(publisher: str | None) -> str:
    """An account name as one routing-key word: `.` separates words and `*`/`#` are
    wildcards in binding keys, so those (and `%`, the escape) are percent-encoded. A
    name without them, the usual case, is its own word, which is what RabbitMQ's topic
    permissions expand `{username}` to."""
    if not publisher:
        return ANONYMOUS_WORD
    return quote(publisher, safe="").replace(".", "%2E")  # quote keeps `.`, not `*#%`


def result_routing_key(publisher: str | None, status: str, reason: str | None) -> str:
    """`result.<publisher>.<status>[.<reason>]`: each result is routed under the account
    that published the request, so topic permissions can let each account bind only its
    own (`^result\\.{username}\\.`) and no tenant reads another's results."""
    key = f"result.{publisher_word(publisher)}.{status}"
    return f"{key}.{reason.lower()}" if reason else key


def cancel_routing_key(publisher: str | None, outcome: str) -> str:
    """`cancel.<publisher>.<outcome>`: answers to cancels, beside the results on the
    results exchange (a consumer of `result.<publisher>.#` does not get them)."""
    return f"cancel.{publisher_word(publisher)}.{outcome}"


def results_binding_key(publisher: str) -> str:
    """What a client binds to receive every result of the requests it publishes."""
    return f"result.{publisher_word(publisher)}.#"


async def declare_exchanges(
    channel: AbstractChannel, broker: BrokerSettings
) -> tuple[AbstractExchange, AbstractExchange]:
    """What a publishing client needs: the requests and results exchanges."""
    unrouted = await channel.declare_exchange(
        f"{broker.results_exchange}.unrouted", aio_pika.ExchangeType.FANOUT, durable=True
    )
    unrouted_queue = await channel.declare_queue(
        f"{broker.results_exchange}.unrouted",
        durable=True,
        arguments={"x-queue-type": "quorum"},
    )
    await unrouted_queue.bind(unrouted)
    results = await channel.declare_exchange(
        broker.results_exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": unrouted.name},
    )
    requests = await channel.declare_exchange(
        broker.requests_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    return requests, results


async def declare_topology(
    channel: AbstractChannel, broker: BrokerSettings, worker: WorkerSettings
) -> Topology:
    requests, results = await declare_exchanges(channel, broker)
    dead_letter = await channel.declare_exchange(
        broker.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(
        f"{broker.requests_queue}.dlq", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dead_letter)

    quorum_args: dict[str, aio_pika.abc.FieldValue] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead_letter.name,
        # A message whose processing kills the worker again and again is dead-lettered
        # after this many deliveries instead of crash-looping the fleet.
        "x-delivery-limit": worker.delivery_limit,
    }
    priority_queues: dict[Priority, AbstractQueue] = {}
    for priority in Priority:
        queue = await channel.declare_queue(
            f"{broker.requests_queue}.{priority.value}", durable=True, arguments=quorum_args
        )
        await queue.bind(requests, routing_key=priority.value)
        priority_queues[priority] = queue
    control = await channel.declare_queue(
        f"{broker.requests_queue}.control", durable=True, arguments=quorum_args
    )
    await control.bind(requests, routing_key=CANCEL_ROUTING_KEY)

    retry = await channel.declare_exchange(
        f"{broker.requests_exchange}.retry", aio_pika.ExchangeType.HEADERS, durable=True
    )
    for delay_s in sorted({*worker.retry_delays_s, 1}):
        queue = await channel.declare_queue(
            retry_queue_name(broker, delay_s),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": delay_s * 1000,
                # No dead-letter routing key: the message returns to the requests
                # exchange with its original routing key, i.e. its priority queue.
                "x-dead-letter-exchange": requests.name,
                # Plain dead-lettering is at-most-once: a message expiring while the
                # target queue is down (a broker restart) would be dropped. At-least-once
                # keeps it until the target has confirmed it (quorum queues, 3.10+).
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        await queue.unbind(retry, arguments={"x-match": "all", LEGACY_DELAY_HEADER: f"{delay_s}s"})
        await queue.bind(retry, arguments={"x-match": "all", DELAY_HEADER: f"{delay_s}s"})
    return Topology(
        requests=requests,
        retry=retry,
        dead_letter=dead_letter,
        results=results,
        priority_queues=priority_queues,
        control_queue=control,
        dlq=dlq,
    )
