"""The aio-pika worker: consume, schedule, answer, publish (confirmed), then ack.

A delivery is acknowledged only after its outcome is safely elsewhere: the result
confirmed by the broker, the original confirmed in the DLQ, or a copy confirmed in a
retry queue. A crash at any point therefore means redelivery, and the ledger turns a
redelivery into a takeover or a republish, never into a second charge.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from zimage_pipeline.decoding import decode_cancel, peek_request_id, read_json_object
from zimage_pipeline.errors import Disposition, InvalidRequestError, JobBusyError, ZImageError
from zimage_pipeline.messages import (
    CANCEL_RESULT_SCHEMA,
    RESULT_SCHEMA,
    CancelOutcome,
    CancelResult,
    GenerationResult,
    Priority,
)
from zimage_pipeline.observability import Metrics, bind_job, unbind_job
from zimage_pipeline.outcomes import Handling, handling
from zimage_pipeline.service import Outcome, RequestService
from zimage_pipeline.settings import BrokerSettings, WorkerSettings
from zimage_pipeline.worker.scheduler import FairScheduler
from zimage_pipeline.worker.topology import (
    DELAY_HEADER,
    LEGACY_DELAY_HEADER,
    Topology,
    cancel_routing_key,
    declare_topology,
    result_routing_key,
)

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-zimage-attempt"
PRINCIPAL_HEADER = "x-zimage-principal"
# Every copy a worker republishes through a delay queue carries its own id and the time
# it was sent, so an operator (and the fault matrix) can tell that each copy came back
# exactly once, and after the delay it asked for.
COPY_ID_HEADER = "x-zimage-copy-id"
REPUBLISHED_AT_HEADER = "x-zimage-republished-at-ms"
LAST_REASON_HEADER = "x-zimage-last-reason"
# What the retry path adds to a copy for its own bookkeeping (the attempt count stays:
# it tells an operator how often the message was tried).
RETRY_PATH_HEADERS = frozenset(
    {
        PRINCIPAL_HEADER,
        COPY_ID_HEADER,
        REPUBLISHED_AT_HEADER,
        LAST_REASON_HEADER,
        DELAY_HEADER,
        LEGACY_DELAY_HEADER,
    }
)
DEFER_DELAY_S = 1
EXIT_FATAL = 70
CANCEL_MESSAGES = {
    CancelOutcome.CANCELLED: "cancelled before it started; nothing is charged",
    CancelOutcome.PENDING: (
        "no request with this id has arrived from you yet; it ends cancelled when it does"
    ),
    CancelOutcome.TOO_LATE: "the request has started or ended; it runs to its end",
    CancelOutcome.UNKNOWN: "no request of yours has this id",
}
# Readiness: pending deliveries with none started or finished for this long mean the
# consumer is wedged. Above any sane generation (a hung one is the GPU watchdog's).
STALL_AFTER_S = 600.0
PUBLISH_TIMEOUT_S = 30.0
ACK_TIMEOUT_S = 10.0


class InternalError(ZImageError):
    """An unexpected exception: retried like a transient failure, then failed."""

    disposition = Disposition.RETRY
    reason = "INTERNAL_ERROR"


# A publication timestamp further back than this is not believed (see queued_since).
MAX_TRUSTED_QUEUE_WAIT_S = 24 * 3600.0


@dataclass(slots=True)
class _Delivery:
    message: AbstractIncomingMessage
    priority: Priority
    principal: str | None
    attempt: int
    received_at: float = field(default_factory=time.time)  # wall clock, for queue wait

    def queued_since(self) -> float:
        """When it was published (the AMQP timestamp, whole seconds, if its publisher set
        one; republished retry copies carry none), else when this worker received it.

        The timestamp is the publisher's word: one older than MAX_TRUSTED_QUEUE_WAIT_S
        (a zero, a wrong clock, a hostile client) is ignored, so that one tenant cannot
        skew the fleet's queue-wait histogram, whose sum feeds averages and alerts."""
        stamp = self.message.timestamp
        if stamp is None:
            return self.received_at
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        published = stamp.timestamp()
        if published < self.received_at - MAX_TRUSTED_QUEUE_WAIT_S:
            return self.received_at
        return min(published, self.received_at)


class Worker:
    """Consumes over one connection at a time. When the connection is lost (a broker
    restart, a network cut), the worker drops what it had buffered (the broker
    redelivers it), reconnects with backoff, and declares and consumes again. This is
    done here, explicitly, rather than by a library's automatic channel restoration,
    so that the recovery is simple to reason about and to test."""

    def __init__(
        self,
        *,
        connect: Callable[[], Awaitable[AbstractConnection]],
        broker: BrokerSettings,
        settings: WorkerSettings,
        service: RequestService,
        metrics: Metrics,
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        self._connect = connect
        self._stall_after_s = stall_after_s
        self._broker = broker
        self._settings = settings
        self._service = service
        self._metrics = metrics
        self._scheduler: FairScheduler[_Delivery] = FairScheduler(
            max_buffered_per_principal=settings.max_buffered_per_principal
        )
        self._wakeup = asyncio.Event()
        self._halt = asyncio.Event()  # set on a fatal error
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._in_flight: dict[asyncio.Task[None], _Delivery] = {}
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._topology: Topology | None = None
        self._connection: AbstractConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._stopping = False
        self.fatal: ZImageError | None = None
        self._consuming = False
        self.connections_opened = 0
        # When a delivery last finished (answered, retried or requeued): readiness
        # requires progress while there is work (see `stalled`).
        self.last_progress = time.monotonic()
        # Set when a result was queued for the result sinks: the runner's dispatcher
        # delivers it now instead of at its next poll.
        self.sinks_pending = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Consuming, and making progress: a worker holding deliveries that neither start
        nor finish for `STALL_AFTER_S` is wedged (it holds its prefetch slots), so it
        must stop attracting traffic even though its connection is fine."""
        return self._consuming and not self.stalled()

    def stalled(self, *, now: float | None = None) -> bool:
        pending = len(self._scheduler) + len(self._in_flight)
        idle_s = (time.monotonic() if now is None else now) - self.last_progress
        return pending > 0 and idle_s > self._stall_after_s

    # -- lifecycle ---------------------------------------------------------------------

    async def _open(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        consume_channel = await connection.channel()
        # The broker cancels a consumer whose queue went away (deleted by an operator or
        # a policy): consuming nothing while saying ready is the failure to avoid. Treat
        # it as a lost connection: not ready, reconnect, declare the topology again and
        # consume again; the deliveries this connection held go back to their queues.
        underlay = await consume_channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            lambda frame: self._consumer_cancelled(frame.consumer_tag, lost)
        )
        await consume_channel.set_qos(prefetch_count=self._settings.prefetch)
        self._topology = await declare_topology(consume_channel, self._broker, self._settings)
        # Publishing on its own channel, with confirms: a result is "sent" only when the
        # broker has taken responsibility for it.
        # on_return_raises: a copy no binding takes (mandatory) fails its publish instead
        # of vanishing, so the delivery it stands for is requeued, never lost.
        self._publish_channel = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        topo = self._topology
        self._consumers = []
        for priority, queue in topo.priority_queues.items():
            tag = await queue.consume(self._on_request_for(priority))
            self._consumers.append((queue, tag))
        tag = await topo.control_queue.consume(self._on_control)
        self._consumers.append((topo.control_queue, tag))
        log.info(
            "worker consuming", extra={"fields": {"queues": [q.name for q, _ in self._consumers]}}
        )

    async def run_until(self, stop: asyncio.Event) -> int:
        """Consume until `stop` is set (SIGTERM) or a fatal error; then drain."""
        dispatcher = asyncio.create_task(self._dispatch_loop())
        backoff_s = 0.5
        while not stop.is_set() and not self._halt.is_set():
            try:
                connection = await self._connect()
            except Exception as exc:
                log.warning("broker unreachable, retrying in %.1fs: %s", backoff_s, exc)
                await _wait_any(stop, self._halt, timeout_s=backoff_s)
                backoff_s = min(backoff_s * 2, 30.0)
                continue
            self._connection = connection
            self.connections_opened += 1
            lost = asyncio.Event()
            connection.close_callbacks.add(lambda *_args, lost=lost: lost.set())
            try:
                await self._open(connection, lost)
            except Exception as exc:
                log.warning("could not set up consuming, reconnecting: %s", exc)
                with suppress(Exception):
                    await connection.close()
                await _wait_any(stop, self._halt, timeout_s=backoff_s)
                continue
            backoff_s = 0.5
            self._consuming = True
            await _wait_any(stop, self._halt, lost)
            self._consuming = False
            if lost.is_set() and not connection.is_closed:
                # A consumer the broker cancelled: this connection is given up like a
                # lost one, so what it held goes back to the queues.
                with suppress(Exception):
                    await connection.close()
            if lost.is_set() and not stop.is_set():
                # Buffered deliveries belong to the dead channel: they cannot be acked
                # and the broker has already put them back in their queues.
                dropped = self._scheduler.drain()
                self._metrics.buffered.set(0)
                log.warning(
                    "broker connection lost; %d buffered delivery(ies) will be "
                    "redelivered; reconnecting",
                    len(dropped),
                )
        await self.shutdown()
        dispatcher.cancel()
        with suppress(asyncio.CancelledError):
            await dispatcher
        if self._connection is not None:
            with suppress(Exception):
                await self._connection.close()
        return EXIT_FATAL if self.fatal is not None else 0

    def _consumer_cancelled(self, consumer_tag: str | None, lost: asyncio.Event) -> None:
        if self._stopping:
            return
        log.error(
            "the broker cancelled consumer %s (its queue was deleted?); "
            "not ready, reconnecting to declare the queues again",
            consumer_tag,
        )
        self._consuming = False
        lost.set()

    async def shutdown(self) -> None:
        """Stop consuming, give in-flight work the grace period, requeue the rest."""
        self._stopping = True
        self._consuming = False
        for queue, tag in self._consumers:
            with suppress(Exception):
                await queue.cancel(tag)
        for delivery in self._scheduler.drain():
            await self._nack_requeue(delivery)
        self._metrics.buffered.set(0)
        if self._in_flight:
            log.info("draining %d in-flight request(s)", len(self._in_flight))
            _, pending = await asyncio.wait(
                set(self._in_flight), timeout=self._settings.shutdown_grace_s
            )
            for task in pending:
                delivery = self._in_flight.pop(task)
                log.warning("grace period over: requeueing an unfinished request")
                await self._nack_requeue(delivery)
                task.cancel()

    # -- receiving ---------------------------------------------------------------------

    def _principal_of(self, message: AbstractIncomingMessage) -> str | None:
        # A retried or deferred copy is republished by a worker under the worker's own
        # (broker-validated) user_id, carrying the original publisher in a header. Only a
        # message that the broker says came from our own account may name a principal.
        headers = message.headers or {}
        if message.user_id == self._broker.username and PRINCIPAL_HEADER in headers:
            value = headers[PRINCIPAL_HEADER]
            return value.decode() if isinstance(value, bytes) else str(value)
        return message.user_id

    def _on_request_for(
        self, priority: Priority
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_request(message: AbstractIncomingMessage) -> None:
            # Nothing here may raise: an exception in a consumer callback leaves the
            # delivery unacknowledged forever, holding a prefetch slot of its queue.
            try:
                principal = self._principal_of(message)
                fairness_key = _fairness_key(message, principal, self._settings.max_body_bytes)
            except Exception:
                log.exception("could not read a delivery's headers; serving it unkeyed")
                principal, fairness_key = None, "?"
            delivery = _Delivery(message, priority, principal, _attempt_of(message))
            if self._stopping:
                await self._nack_requeue(delivery)
                return
            if not self._scheduler and not self._in_flight:
                self.last_progress = time.monotonic()  # idle until now: not a stall
            if not self._scheduler.offer(delivery, priority=priority, principal=fairness_key):
                await self._send_to_back(delivery)
                return
            self._metrics.buffered.set(len(self._scheduler))
            self._wakeup.set()

        return on_request

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        """A cancel: applied if it may be, answered (`zimage.cancel-result/v1`) under
        `cancel.<publisher>.<outcome>`, then acked; an invalid one also dead-lettered."""
        try:
            principal = self._principal_of(message)
            try:
                cancel = decode_cancel(message.body, max_bytes=self._settings.max_body_bytes)
                if not principal:
                    raise InvalidRequestError(
                        "the message carries no AMQP user_id; publishers must set it"
                    )
            except InvalidRequestError as exc:
                await self._dead_letter(message, reason=exc.reason, error=str(exc))
                claimed = peek_request_id(message.body, max_bytes=self._settings.max_body_bytes)
                await self._answer_cancel(
                    message, principal, claimed or "", CancelOutcome.INVALID, str(exc)
                )
                await message.ack()
                return
            outcome = await self._service.cancel(cancel.request_id, principal=principal)
            log.info(
                "cancel %s",
                outcome.value,
                extra={"fields": {"request_id": cancel.request_id, "user": principal}},
            )
            await self._answer_cancel(
                message, principal, cancel.request_id, outcome, CANCEL_MESSAGES[outcome]
            )
            await message.ack()
        except Exception as exc:
            # The ledger or the broker failed mid-way: the cancel comes back (requeued) and
            # is applied again, which is idempotent, and answered then.
            log.warning("could not process a cancel; requeueing it: %s", exc)
            with suppress(Exception):
                await asyncio.wait_for(message.nack(requeue=True), ACK_TIMEOUT_S)

    async def _answer_cancel(
        self,
        message: AbstractIncomingMessage,
        principal: str | None,
        request_id: str,
        outcome: CancelOutcome,
        text: str,
    ) -> None:
        answer = CancelResult(
            request_id=request_id,
            outcome=outcome,
            message=text,
            correlation_id=message.correlation_id or message.message_id,
            finished_at=datetime.now(UTC),
        )
        exchange = await self._publish_exchange(self._require_topology().results.name)
        await exchange.publish(
            aio_pika.Message(
                answer.to_json_bytes(),
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=answer.correlation_id,
                type=CANCEL_RESULT_SCHEMA,
            ),
            routing_key=cancel_routing_key(principal, outcome.value),
            mandatory=True,
            timeout=PUBLISH_TIMEOUT_S,
        )

    # -- dispatching -------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            await self._slots.acquire()
            delivery = self._scheduler.take()
            while delivery is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                delivery = self._scheduler.take()
            self._metrics.buffered.set(len(self._scheduler))
            self.last_progress = time.monotonic()
            self._metrics.queue_wait_seconds.labels(delivery.priority.value).observe(
                max(0.0, time.time() - delivery.queued_since())
            )
            task = asyncio.create_task(self._process(delivery))
            self._in_flight[task] = delivery
            self._metrics.in_flight.set(len(self._in_flight))
            task.add_done_callback(self._on_task_done)
            if self.fatal is not None:
                return

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._metrics.in_flight.set(len(self._in_flight))
        self._slots.release()

    async def _process(self, delivery: _Delivery) -> None:
        message = delivery.message
        token = bind_job(user=delivery.principal or "?")
        try:
            try:
                outcome = await self._service.handle(
                    message.body, principal=delivery.principal, routed_as=delivery.priority
                )
            except ZImageError as exc:
                await self._on_error(delivery, exc)
                return
            except Exception as exc:
                log.exception("unexpected error while handling a request")
                await self._on_error(delivery, InternalError(f"{type(exc).__name__}: {exc}"))
                return
            await self._answer(delivery, outcome)
        except Exception:
            # Answering failed (a publish refused or unconfirmed, the ledger down while
            # giving up): the delivery must not stay unacknowledged in this worker.
            # Requeued, it comes back and is answered from the ledger or retried.
            log.exception("could not answer a delivery; requeueing it")
            await self._nack_requeue(delivery)
        finally:
            self.last_progress = time.monotonic()
            unbind_job(token)

    async def _answer(self, delivery: _Delivery, outcome: Outcome) -> None:
        # Echo what the publisher set to match answers to its messages.
        message = delivery.message
        result = outcome.result.model_copy(
            update={"correlation_id": message.correlation_id or message.message_id}
        )
        token = bind_job(request_id=result.request_id)
        try:
            if outcome.dead_letter:
                await self._dead_letter(
                    delivery.message, reason=result.reason or "REJECTED", error=result.message or ""
                )
            await self._publish_result(result, publisher=delivery.principal)
            try:
                await self._service.record_published(
                    result, principal=delivery.principal or "", ledger_key=outcome.ledger_key
                )
            except ZImageError as exc:  # the result is out; a missing event is logged, not fatal
                log.warning("could not record the published event: %s", exc)
            # Before the ack: a failure here requeues the delivery (see hand_to_sinks).
            if await self._service.hand_to_sinks(
                result, ledger_key=outcome.ledger_key, publisher=delivery.principal
            ):
                self.sinks_pending.set()
            if not outcome.republished:  # a duplicate's stored answer was counted once
                self._metrics.jobs.labels(result.status.value, result.reason or "").inc()
                for phase, seconds in result.timings_s.items():
                    self._metrics.phase_seconds.labels(phase).observe(seconds)
                self._metrics.images.inc(len(result.images))
            log.info(
                "answered %s%s",
                result.status.value,
                f" ({result.reason})" if result.reason else "",
                extra={"fields": {"republished": outcome.republished}},
            )
            await self._ack(delivery)
        finally:
            unbind_job(token)

    async def _on_error(self, delivery: _Delivery, error: ZImageError) -> None:
        if handling(error) is Handling.EXIT:
            log.critical("fatal error, stopping the worker: %s", error)
            self.fatal = error
            await self._nack_requeue(delivery)
            self._halt.set()
            return
        if isinstance(error, JobBusyError):
            # Not a failure: the same request is in progress elsewhere. Come back later
            # without spending the retry budget; by then it is answered from the ledger.
            await self._republish_delayed(
                delivery,
                delay_s=self._settings.retry_delays_s[0],
                attempt=delivery.attempt,
                reason=error.reason,
            )
            await self._ack(delivery)
            return
        attempt = delivery.attempt + 1
        if attempt >= self._settings.max_attempts:
            log.error("retry budget spent (%d attempts): %s", attempt, error)
            outcome = await self._service.release_after_retries(
                delivery.message.body, principal=delivery.principal or "", error=error
            )
            await self._answer(delivery, outcome)
            return
        delays = self._settings.retry_delays_s
        delay_s = delays[min(attempt - 1, len(delays) - 1)]
        log.warning("transient failure, retrying in %ds (attempt %d): %s", delay_s, attempt, error)
        self._metrics.retries.labels(error.reason).inc()
        await self._republish_delayed(
            delivery, delay_s=delay_s, attempt=attempt, reason=error.reason
        )
        await self._ack(delivery)

    # -- publishing --------------------------------------------------------------------

    def _require_topology(self) -> Topology:
        if self._topology is None:
            raise RuntimeError("worker not started")
        return self._topology

    async def _publish_result(self, result: GenerationResult, *, publisher: str | None) -> None:
        message = aio_pika.Message(
            result.to_json_bytes(),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=result.request_id or None,
            correlation_id=result.correlation_id,
            type=RESULT_SCHEMA,
            headers={"status": result.status.value, "reason": result.reason or ""},
        )
        exchange = await self._publish_exchange(self._require_topology().results.name)
        await exchange.publish(
            message,
            routing_key=result_routing_key(publisher, result.status.value, result.reason),
            mandatory=True,
            timeout=PUBLISH_TIMEOUT_S,
        )

    async def _publish_exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        assert self._publish_channel is not None
        return await self._publish_channel.get_exchange(name, ensure=False)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, *, reason: str, error: str
    ) -> None:
        # The publisher, also of a copy this worker deferred or retried under its own
        # account (it carries the publisher in a header only that account may set), and
        # none of the retry path's own headers: an operator reads the message as sent.
        headers = {
            key: value
            for key, value in (message.headers or {}).items()
            if key not in RETRY_PATH_HEADERS
        }
        copy = aio_pika.Message(
            message.body,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers={
                **headers,
                "x-zimage-reason": reason,
                "x-zimage-error": error[:1000],
                "x-zimage-original-routing-key": message.routing_key or "",
                "x-zimage-original-user-id": self._principal_of(message) or "",
            },
        )
        exchange = await self._publish_exchange(self._require_topology().dead_letter.name)
        await exchange.publish(
            copy,
            routing_key=message.routing_key or "",
            mandatory=True,
            timeout=PUBLISH_TIMEOUT_S,
        )

    async def _republish_delayed(
        self, delivery: _Delivery, *, delay_s: int, attempt: int, reason: str
    ) -> None:
        message = delivery.message
        copy = aio_pika.Message(
            message.body,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,  # the publisher matches answers by it
            user_id=self._broker.username,
            headers={
                **(message.headers or {}),
                DELAY_HEADER: f"{delay_s}s",
                COPY_ID_HEADER: uuid.uuid4().hex,
                REPUBLISHED_AT_HEADER: int(time.time() * 1000),
                ATTEMPT_HEADER: attempt,
                PRINCIPAL_HEADER: delivery.principal or "",
                LAST_REASON_HEADER: reason,
            },
        )
        exchange = await self._publish_exchange(self._require_topology().retry.name)
        await exchange.publish(
            copy,
            routing_key=message.routing_key or "",
            mandatory=True,
            timeout=PUBLISH_TIMEOUT_S,
        )

    async def _send_to_back(self, delivery: _Delivery) -> None:
        """Fairness: this principal has its share waiting; requeue behind everyone else."""
        try:
            await self._republish_delayed(
                delivery, delay_s=DEFER_DELAY_S, attempt=delivery.attempt, reason="DEFERRED"
            )
        except Exception:
            log.exception("could not defer a delivery; requeueing it")
            await self._nack_requeue(delivery)
            return
        await self._ack(delivery)

    async def _ack(self, delivery: _Delivery) -> None:
        try:
            # A delivery of a channel that died with the connection can wait forever
            # for its ack to be written: bound it, the broker redelivers anyway.
            await asyncio.wait_for(delivery.message.ack(), ACK_TIMEOUT_S)
        except Exception as exc:  # channel gone (broker restart): it will be redelivered
            log.warning("ack failed, the delivery will be redelivered: %s", exc)

    async def _nack_requeue(self, delivery: _Delivery) -> None:
        try:
            await asyncio.wait_for(delivery.message.nack(requeue=True), ACK_TIMEOUT_S)
        except Exception as exc:
            log.warning("nack failed, the delivery will be redelivered: %s", exc)


async def _wait_any(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _attempt_of(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


def _fairness_key(message: AbstractIncomingMessage, principal: str | None, max_bytes: int) -> str:
    """The end user a request is for (fairness is per person served), else the publisher.
    Read with the decoder's own limits (size, nesting), so no body can make it raise."""
    document = read_json_object(message.body, max_bytes=max_bytes)
    if document is not None and isinstance(document.get("on_behalf_of"), str):
        return str(document["on_behalf_of"])[:256]
    return principal or "?"
