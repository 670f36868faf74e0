"""The result sinks' dispatcher: queue published results, deliver due ones, retry, give up.

The worker calls `enqueue_result` after the broker confirmed a result (ports.ResultOutbox)
and runs `run_once` as the `result_sinks` periodic job (woken when something was queued).
Each due row is claimed in the ledger (ledger/outbox.py), handed to its sink, and marked
delivered, or failed: due again after the sink's backoff, dead after its `max_attempts`.
A sink's failure is logged and recorded, never raised: the worker's other work goes on.

A row whose sink is not configured any more (the plugin was disabled or renamed since
it was queued) fails like an attempt, with "sink not configured": kept pending it would
stay in the outbox forever unseen; failing, it is retried with the default policy (the
sink may come back with the next deployment) and ends dead, visible in `audit show`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from zimage_pipeline.ledger.outbox import Claimed, DeliveryState, RetryPolicy, SinkOutbox
from zimage_pipeline.ledger.txn import utcnow
from zimage_pipeline.plugins.api import ResultSink, SinkDelivery

log = logging.getLogger(__name__)

# A claim must outlast the deliveries made under it: a batch is delivered one row after
# another, so a webhook's worst case is batch * len(urls) * timeout_s (5 * 3 * 10 s with
# the defaults). A claim that runs out only risks a repeat, which receivers drop by id.
DEFAULT_LEASE_S = 300.0
DEFAULT_BATCH = 5
NOT_CONFIGURED = "sink not configured"
_ERROR_LOGGED = 300  # characters of a sink's error in a log line


class OutboxDispatcher:
    def __init__(
        self,
        outbox: SinkOutbox,
        sinks: Mapping[str, ResultSink],
        *,
        worker_id: str,
        clock: Callable[[], datetime] = utcnow,
        lease_s: float = DEFAULT_LEASE_S,
        batch: int = DEFAULT_BATCH,
        default_policy: RetryPolicy | None = None,
    ) -> None:
        """`sinks`: the enabled result sinks by plugin name (LoadedPlugins.result_sinks).
        A sink with a `retry_policy` attribute (the webhook) is retried by it, any other
        by `default_policy`."""
        self._outbox = outbox
        self._sinks = dict(sinks)
        self._worker_id = worker_id
        self._clock = clock
        self._lease_s = lease_s
        self._batch = batch
        self._default_policy = default_policy or RetryPolicy()

    def enqueue_result(
        self, request_key: str, event: Mapping[str, Any], publisher: str | None = None
    ) -> list[str]:
        """Queue a published result for every configured sink that wants its publisher's
        results (ports.ResultOutbox); the delivery ids. Idempotent per (sink, request).
        Raises if the ledger cannot take it (LedgerUnavailableError): the caller requeues
        the request's delivery."""
        sinks = [name for name, sink in self._sinks.items() if _wants(sink, publisher)]
        if not sinks:
            return []
        return self._outbox.enqueue(
            request_key, event, sinks, publisher=publisher, now=self._clock()
        )

    def run_once(self, limit: int = 50) -> int:
        """Deliver up to `limit` due rows, claiming `batch` at a time (a claim is a
        lease that must outlast the batch's deliveries); the number of attempts made.
        Stops early when a claim finds nothing (none due, or other workers took them)."""
        attempts = 0
        while attempts < limit:
            claims = self._outbox.claim_due(
                self._clock(), limit=min(self._batch, limit - attempts), lease_s=self._lease_s
            )
            if not claims:
                break
            for claim in claims:
                self._attempt(claim)
            attempts += len(claims)
        return attempts

    def _policy(self, sink: ResultSink | None) -> RetryPolicy:
        policy = getattr(sink, "retry_policy", None)
        return policy if isinstance(policy, RetryPolicy) else self._default_policy

    def _attempt(self, claim: Claimed) -> None:
        sink = self._sinks.get(claim.sink)
        policy = self._policy(sink)
        if claim.attempt > policy.max_attempts:
            # The lease of the last attempt ran out without a report: its worker died
            # (or the delivery hung). No attempt is left to make.
            self._failed(claim, policy, "the last attempt never reported (worker lost?)")
            return
        if sink is None:
            self._failed(claim, policy, NOT_CONFIGURED)
            return
        delivery = SinkDelivery(
            delivery_id=claim.delivery_id,
            request_id=claim.request_id,
            attempt=claim.attempt,
            event=claim.event,
            publisher=claim.publisher,
        )
        try:
            sink.deliver(delivery)
        except Exception as exc:  # a plugin's failure, whatever it is, is one attempt's
            self._failed(claim, policy, f"{type(exc).__name__}: {exc}")
            return
        self._outbox.delivered(claim.delivery_id, now=self._clock())

    def _failed(self, claim: Claimed, policy: RetryPolicy, error: str) -> None:
        state = self._outbox.failed(
            claim.delivery_id,
            error,
            max_attempts=policy.max_attempts,
            backoff_base_s=policy.backoff_base_s,
            backoff_max_s=policy.backoff_max_s,
            now=self._clock(),
            lease_until=claim.lease_until,
        )
        fields = {
            "sink": claim.sink,
            "delivery_id": claim.delivery_id,
            "request_id": claim.request_id,
            "attempt": claim.attempt,
            "max_attempts": policy.max_attempts,
            "worker_id": self._worker_id,
            "error": error[:_ERROR_LOGGED],
            "state": state.value if state else "superseded",
        }
        if state is DeliveryState.DEAD:
            log.error(
                "result sink %s: delivery %s of %s is dead after %d attempts: %s",
                claim.sink,
                claim.delivery_id,
                claim.request_id,
                claim.attempt,
                fields["error"],
                extra={"fields": fields},
            )
        else:
            log.warning(
                "result sink %s: attempt %d of delivery %s failed: %s",
                claim.sink,
                claim.attempt,
                claim.delivery_id,
                fields["error"],
                extra={"fields": fields},
            )


def _wants(sink: ResultSink, publisher: str | None) -> bool:
    """Whether `sink` takes this publisher's results (its optional `wants`; else all)."""
    wants = getattr(sink, "wants", None)
    return True if wants is None else bool(wants(publisher))
