"""The client side of the contract: publish a request (or a cancel), wait for its result.

Used by `zimage-pipeline submit` / `cancel` and by the demo. The client binds its
private results queue *before* publishing, so a fast answer cannot be missed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity, DeliveryError
from pamqp.commands import Basic

from zimage_pipeline.broker import connect_robust
from zimage_pipeline.messages import CancelRequest, GenerationRequest, GenerationResult
from zimage_pipeline.settings import BrokerSettings
from zimage_pipeline.worker.topology import CANCEL_ROUTING_KEY, results_binding_key


class ResultTimeoutError(TimeoutError):
    pass


class NotPublishedError(RuntimeError):
    """The broker did not take the message: nothing was queued, so nothing will answer."""


async def _publish(
    exchange: AbstractExchange, message: aio_pika.Message, *, routing_key: str, what: str
) -> None:
    """Publish mandatory and confirmed; say in words why the broker refused, if it did.

    A return means no queue is bound for the routing key: the usual cause is that no
    worker has started on this broker yet (workers declare the queues), or a priority
    that no worker serves. A nack means a queue refused it (e.g. full)."""
    try:
        await exchange.publish(message, routing_key=routing_key, mandatory=True)
    except DeliveryError as exc:
        frame = exc.frame
        if isinstance(frame, Basic.Return):
            raise NotPublishedError(
                f"{what} was not queued: exchange {exchange.name!r} has no queue for "
                f"routing key {routing_key!r} ({frame.reply_text}); start a worker on "
                "this broker first, it declares the queues"
            ) from None
        raise NotPublishedError(
            f"{what} was not queued: the broker refused it ({frame.name}); try again later"
        ) from None


@contextmanager
def _missing_exchange_explained(what: str) -> Iterator[None]:
    """Workers declare the exchanges: on a broker where none has started, they are missing."""
    try:
        yield
    except ChannelNotFoundEntity as exc:
        raise NotPublishedError(
            f"{what} was not queued: {exc.args[0] if exc.args else exc}; start a worker on "
            "this broker first, it declares the exchanges and queues"
        ) from None


async def submit(
    request: GenerationRequest,
    *,
    broker: BrokerSettings,
    username: str,
    password: str,
    wait_s: float | None,
) -> GenerationResult | None:
    """Publish `request` as `username` (the broker validates user_id); optionally wait."""
    connection = await connect_robust(
        broker, login=username, password=password, name=f"zimage-submit {username}"
    )
    with _missing_exchange_explained(f"request {request.request_id}"):
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            answers: asyncio.Queue[GenerationResult] = asyncio.Queue()
            if wait_s is not None:
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                results = await channel.get_exchange(broker.results_exchange, ensure=False)
                await queue.bind(results, routing_key=results_binding_key(username))

                async def on_result(message: AbstractIncomingMessage) -> None:
                    async with message.process():
                        document: dict[str, Any] = json.loads(message.body)
                        # A refused message is answered with request_id "" and the id it
                        # claimed (anyone may publish junk under any id); on this
                        # publisher's own result queue, that claim is ours.
                        mine = request.request_id
                        if mine in (document.get("request_id"), document.get("claimed_request_id")):
                            await answers.put(GenerationResult.model_validate(document))

                await queue.consume(on_result)
            requests = await channel.get_exchange(broker.requests_exchange, ensure=False)
            await _publish(
                requests,
                aio_pika.Message(
                    request.model_dump_json(by_alias=True, exclude_none=True).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=request.request_id,
                    user_id=username,
                    type="zimage.request/v1",
                    # The workers' time-in-queue histogram counts from it (whole seconds).
                    timestamp=datetime.now(UTC),
                ),
                routing_key=request.priority.value,
                what=f"request {request.request_id}",
            )
            if wait_s is None:
                return None
            try:
                return await asyncio.wait_for(answers.get(), timeout=wait_s)
            except TimeoutError as exc:
                raise ResultTimeoutError(
                    f"no result for {request.request_id} within {wait_s:g} s"
                ) from exc


async def cancel(request_id: str, *, broker: BrokerSettings, username: str, password: str) -> None:
    connection = await connect_robust(
        broker, login=username, password=password, name=f"zimage-cancel {username}"
    )
    with _missing_exchange_explained(f"the cancel of {request_id}"):
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            requests = await channel.get_exchange(broker.requests_exchange, ensure=False)
            body = CancelRequest(request_id=request_id).model_dump_json(by_alias=True).encode()
            await _publish(
                requests,
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    user_id=username,
                    type="zimage.cancel/v1",
                ),
                routing_key=CANCEL_ROUTING_KEY,
                what=f"the cancel of {request_id}",
            )
