"""The client side of the contract: publish a request (or a cancel), wait for its result.

Used by `zimage-pipeline submit` / `cancel` and by the demo. The client binds its
private results queue *before* publishing, so a fast answer cannot be missed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from zimage_pipeline.broker import connect_robust
from zimage_pipeline.messages import CancelRequest, GenerationRequest, GenerationResult
from zimage_pipeline.settings import BrokerSettings
from zimage_pipeline.worker.topology import CANCEL_ROUTING_KEY, results_binding_key


class ResultTimeoutError(TimeoutError):
    pass


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
                    if document.get("request_id") == request.request_id:
                        await answers.put(GenerationResult.model_validate(document))

            await queue.consume(on_result)
        requests = await channel.get_exchange(broker.requests_exchange, ensure=False)
        await requests.publish(
            aio_pika.Message(
                request.model_dump_json(by_alias=True, exclude_none=True).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=request.request_id,
                user_id=username,
                type="zimage.request/v1",
            ),
            routing_key=request.priority.value,
            mandatory=True,
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
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        requests = await channel.get_exchange(broker.requests_exchange, ensure=False)
        body = CancelRequest(request_id=request_id).model_dump_json(by_alias=True).encode()
        await requests.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=username,
                type="zimage.cancel/v1",
            ),
            routing_key=CANCEL_ROUTING_KEY,
            mandatory=True,
        )
