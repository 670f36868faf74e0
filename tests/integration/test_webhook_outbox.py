"""The webhook result sink through the ledger's outbox, on SQLite and PostgreSQL, against
a real HTTP receiver: signed deliveries, retries with one delivery id, dead deliveries
in `audit show`, a restart, two dispatchers racing, idempotent enqueue, the bound."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from zimage_pipeline.audit.chain import AuditLog
from zimage_pipeline.cli import app
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.outbox import DeliveryState, RetryPolicy, SinkOutbox
from zimage_pipeline.plugins.api import ResultSink
from zimage_pipeline.plugins.webhook import WebhookSink, canonical_body, create, verify_signature
from zimage_pipeline.ports import ResultOutbox
from zimage_pipeline.settings import DatabaseSettings
from zimage_pipeline.wiring.sinks import NOT_CONFIGURED, OutboxDispatcher

pytestmark = pytest.mark.integration

SECRET = "whsec-integration"
START = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def result_event(request_id: str) -> dict[str, Any]:
    """A result event as the worker publishes it (GenerationResult, JSON mode)."""
    return {
        "schema": "zimage.result/v1",
        "request_id": request_id,
        "status": "succeeded",
        "reason": None,
        "on_behalf_of": "alice",
        "images": [{"index": 0, "key": f"images/{request_id}/0.png", "sha256": "ab" * 32}],
        "labels": {"sku": "SKU-ü-1"},
        "timings_s": {"generate": 1.25},
        "finished_at": "2026-12-03T12:00:00Z",
    }


# -- the receiver --------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Records every POST; answers `script` in order, then `default`."""

    url: str = ""
    script: list[int] = field(default_factory=list)
    default: int = 200
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, received: Received) -> int:
        with self.lock:
            self.requests.append(received)
            return self.script.pop(0) if self.script else self.default


@contextmanager
def serving() -> Iterator[Receiver]:
    """A receiver on a free local port, for as long as the block runs."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received = Received(self.path, dict(self.headers.items()), body)
            time.sleep(state.delay_s)
            self.send_response(state.answer(received))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test's output stays readable

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/zimage"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving() as state:
        yield state


@pytest.fixture
def other_receiver() -> Iterator[Receiver]:
    """A second tenant's receiver."""
    with serving() as state:
        yield state


# -- the ledger, the clock, the sink -------------------------------------------------------


def ledger_engine(url: str) -> Engine:
    return create_ledger_engine(DatabaseSettings(url=url, pool_size=4))


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    value = ledger_engine(ledger_url)
    migrate.upgrade(value)
    yield value
    value.dispose()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def webhook(receiver: Receiver, **table: Any) -> WebhookSink:
    return create(
        {
            "urls": [receiver.url],
            "secret": SECRET,
            "timeout_s": 5,
            "max_attempts": 3,
            "backoff_base_s": 1,
            "backoff_max_s": 1.5,
            **table,
        }
    )


def highest(_low: float, high: float) -> float:
    """The backoff's draw, pinned to the top of its interval: the waits are exact."""
    return high


def dispatcher(
    outbox: SinkOutbox, sinks: dict[str, ResultSink], clock: Clock, **options: Any
) -> OutboxDispatcher:
    return OutboxDispatcher(outbox, sinks, worker_id="test-worker", clock=clock, **options)


def assert_signed(received: Received) -> None:
    assert received.headers["Content-Type"] == "application/json"
    assert verify_signature(
        SECRET.encode(),
        timestamp=received.headers["X-Zimage-Timestamp"],
        body=received.body,
        signature=received.headers["X-Zimage-Signature"],
    )


# -- tests ---------------------------------------------------------------------------------


def test_a_result_is_delivered_once_with_a_valid_signature(
    engine: Engine, receiver: Receiver
) -> None:
    clock = Clock()
    outbox = SinkOutbox(engine)
    worker = dispatcher(outbox, {"webhook": webhook(receiver)}, clock)
    port: ResultOutbox = worker  # what the service calls after a result is published
    event = result_event("req-1")

    ids = port.enqueue_result("req-1", event)

    assert ids == [hashlib.sha256(b"webhook\0req-1").hexdigest()[:32]]
    assert worker.run_once() == 1
    assert worker.run_once() == 0
    [received] = receiver.requests
    assert received.path == "/hooks/zimage"
    assert_signed(received)
    assert received.body == canonical_body(event)
    assert json.loads(received.body) == event  # the event as queued, through the ledger
    assert received.headers["X-Zimage-Delivery"] == ids[0]
    assert received.headers["X-Zimage-Attempt"] == "1"
    [row] = outbox.deliveries("req-1")
    assert (row.sink, row.state, row.attempts, row.last_error) == (
        "webhook",
        DeliveryState.DELIVERED,
        1,
        None,
    )
    assert row.finished_at == START


def test_two_failures_then_success_is_three_attempts_of_one_delivery(
    engine: Engine, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script = [500, 500]
    clock = Clock()
    outbox = SinkOutbox(engine, uniform=highest)
    worker = dispatcher(outbox, {"webhook": webhook(receiver)}, clock)
    [delivery] = worker.enqueue_result("req-2", result_event("req-2"))

    caplog.set_level(logging.WARNING, logger="zimage_pipeline.wiring.sinks")
    assert worker.run_once() == 1
    [row] = outbox.deliveries("req-2")
    assert row.state is DeliveryState.PENDING
    assert row.next_attempt_at == START + timedelta(seconds=1)  # base * 2^0
    assert "HTTP 500" in (row.last_error or "")
    assert worker.run_once() == 0  # not due before its backoff

    clock.advance(1)
    assert worker.run_once() == 1
    [row] = outbox.deliveries("req-2")
    assert row.next_attempt_at == clock.now + timedelta(seconds=1.5)  # base * 2^1, capped

    clock.advance(1.5)
    assert worker.run_once() == 1
    assert [r.headers["X-Zimage-Delivery"] for r in receiver.requests] == [delivery] * 3
    assert [r.headers["X-Zimage-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert len({r.body for r in receiver.requests}) == 1
    for received in receiver.requests:
        assert_signed(received)
    [row] = outbox.deliveries("req-2")
    assert (row.state, row.attempts, row.last_error) == (DeliveryState.DELIVERED, 3, None)
    failures = [r for r in caplog.records if r.name == "zimage_pipeline.wiring.sinks"]
    assert [(r.levelno, r.fields["attempt"]) for r in failures] == [  # type: ignore[attr-defined]
        (logging.WARNING, 1),
        (logging.WARNING, 2),
    ]


def test_a_delivery_that_always_fails_is_dead_and_audit_show_lists_it(
    engine: Engine, ledger_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.default = 500
    clock = Clock()
    outbox = SinkOutbox(engine)
    worker = dispatcher(outbox, {"webhook": webhook(receiver)}, clock)
    AuditLog(engine).append(
        request_id="req-3", event_type="published", actor="alice", payload={"status": "ok"}
    )
    [delivery] = worker.enqueue_result("req-3", result_event("req-3"))

    caplog.set_level(logging.WARNING, logger="zimage_pipeline.wiring.sinks")
    for _ in range(5):  # more turns than attempts: the dead row is never tried again
        worker.run_once()
        clock.advance(10)

    assert len(receiver.requests) == 3
    [row] = outbox.deliveries("req-3")
    assert (row.state, row.attempts) == (DeliveryState.DEAD, 3)
    assert row.last_error is not None and "HTTP 500" in row.last_error
    assert SECRET not in row.last_error and "/hooks/zimage" not in row.last_error
    dead = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.fields["state"] for r in dead] == ["dead"]  # type: ignore[attr-defined]

    runner = CliRunner()
    env = {"ZIMAGE_DATABASE__URL": ledger_url}
    shown = runner.invoke(app, ["audit", "show", "req-3"], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    published = next(i for i, line in enumerate(lines) if " published " in line)
    heading = lines.index("sink deliveries (1):")
    assert published < heading
    assert lines[heading + 1].split()[:5] == ["webhook", delivery, "dead", "attempts", "3"]
    assert "HTTP 500" in lines[heading + 2]

    as_json = runner.invoke(app, ["audit", "show", "req-3", "--format", "json"], env=env)
    [listed] = json.loads(as_json.output)["deliveries"]
    assert (listed["delivery_id"], listed["state"], listed["attempts"]) == (delivery, "dead", 3)


def test_a_restarted_worker_delivers_what_was_left_pending(
    ledger_url: str, engine: Engine, receiver: Receiver
) -> None:
    clock = Clock()
    first = dispatcher(SinkOutbox(engine), {"webhook": webhook(receiver)}, clock)
    first.enqueue_result("req-a", result_event("req-a"))
    clock.advance(1)  # req-a is the older, so the first claim takes it
    first.enqueue_result("req-b", result_event("req-b"))
    # The first worker claims req-a's first attempt and dies before it is made.
    [claimed] = SinkOutbox(engine).claim_due(clock(), limit=1, lease_s=30)
    engine.dispose()

    restarted_engine = ledger_engine(ledger_url)
    try:
        restarted = dispatcher(SinkOutbox(restarted_engine), {"webhook": webhook(receiver)}, clock)
        assert restarted.run_once() == 1  # req-b; req-a is still leased
        clock.advance(31)
        assert restarted.run_once() == 1
        rows = {r.request_id: r for r in SinkOutbox(restarted_engine).deliveries("req-a")}
        rows |= {r.request_id: r for r in SinkOutbox(restarted_engine).deliveries("req-b")}
    finally:
        restarted_engine.dispose()

    seen = [
        (json.loads(r.body)["request_id"], r.headers["X-Zimage-Attempt"]) for r in receiver.requests
    ]
    assert claimed.request_id == "req-a"
    assert seen == [("req-b", "1"), ("req-a", "2")]  # the lost attempt counts
    assert {k: (v.state, v.attempts) for k, v in rows.items()} == {
        "req-a": (DeliveryState.DELIVERED, 2),
        "req-b": (DeliveryState.DELIVERED, 1),
    }


@pytest.mark.timeout(120)
def test_two_dispatchers_on_one_ledger_make_each_attempt_once(
    ledger_url: str, engine: Engine, receiver: Receiver
) -> None:
    receiver.delay_s = 0.005  # deliveries overlap the other worker's claims
    queue = OutboxDispatcher(SinkOutbox(engine), {"webhook": webhook(receiver)}, worker_id="q")
    ids = [
        queue.enqueue_result(f"race-{n:02d}", result_event(f"race-{n:02d}"))[0] for n in range(20)
    ]
    attempts: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(worker_id: str) -> None:
        own_engine = ledger_engine(ledger_url)  # a worker process has its own pool
        try:
            outbox = SinkOutbox(own_engine)
            worker = OutboxDispatcher(
                outbox, {"webhook": webhook(receiver)}, worker_id=worker_id, batch=2
            )
            start.wait()
            made = 0
            while outbox.counts()[DeliveryState.PENDING]:
                made_now = worker.run_once(limit=4)
                if not made_now:
                    time.sleep(0.01)  # the rest is the other worker's, being delivered
                made += made_now
            attempts.append(made)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            own_engine.dispose()

    threads = [threading.Thread(target=work, args=(f"worker-{n}",)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)

    assert not errors, errors
    assert sum(attempts) == 20  # every claim is one attempt, made by one worker
    delivered = sorted(r.headers["X-Zimage-Delivery"] for r in receiver.requests)
    assert delivered == sorted(ids)  # each delivery once
    assert {r.headers["X-Zimage-Attempt"] for r in receiver.requests} == {"1"}
    assert SinkOutbox(engine).counts() == {
        DeliveryState.PENDING: 0,
        DeliveryState.DELIVERED: 20,
        DeliveryState.DEAD: 0,
    }


def test_enqueueing_a_result_twice_keeps_one_row(engine: Engine, receiver: Receiver) -> None:
    clock = Clock()
    outbox = SinkOutbox(engine)
    worker = dispatcher(outbox, {"webhook": webhook(receiver)}, clock)
    first = worker.enqueue_result("req-4", result_event("req-4"))
    again = worker.enqueue_result("req-4", {**result_event("req-4"), "status": "changed"})

    assert first == again
    assert len(outbox.deliveries("req-4")) == 1
    assert worker.run_once() == 1
    assert worker.enqueue_result("req-4", result_event("req-4")) == first  # a republish
    assert worker.run_once() == 0
    assert len(receiver.requests) == 1
    assert json.loads(receiver.requests[0].body)["status"] == "succeeded"  # the first one
    # Another sink of the same request is another delivery.
    [other] = outbox.enqueue("req-4", result_event("req-4"), ["audit-mirror"])
    assert other not in first and len(outbox.deliveries("req-4")) == 2


def test_each_publishers_results_go_to_its_own_receiver_signed_with_its_secret(
    engine: Engine, ledger_url: str, receiver: Receiver, other_receiver: Receiver
) -> None:
    """Two tenants with their own routes: the CMS's receiver never sees the PIM's
    results, and each delivery verifies with its tenant's secret only. A publisher
    with no route (and no URLs for everyone) gets nothing queued."""
    clock = Clock()
    outbox = SinkOutbox(engine)
    sink = create(
        {
            "publishers": {
                "cms-publisher": {"urls": [receiver.url], "secret": "cms-secret"},
                "pim-sync": {"urls": [other_receiver.url], "secret": "pim-secret"},
            },
            "timeout_s": 5,
        }
    )
    worker = dispatcher(outbox, {"webhook": sink}, clock)

    assert worker.enqueue_result("cms-1", result_event("cms-1"), "cms-publisher")
    assert worker.enqueue_result("pim-1", result_event("pim-1"), "pim-sync")
    assert worker.enqueue_result("bob-1", result_event("bob-1"), "bob") == []
    assert outbox.deliveries("bob-1") == []
    assert worker.run_once() == 2

    def posted(to: Receiver) -> list[str]:
        return [json.loads(r.body)["request_id"] for r in to.requests]

    assert posted(receiver) == ["cms-1"]
    assert posted(other_receiver) == ["pim-1"]
    for to, mine, theirs in ((receiver, "cms", "pim"), (other_receiver, "pim", "cms")):
        [post] = to.requests
        signed = {
            "timestamp": post.headers["X-Zimage-Timestamp"],
            "body": post.body,
            "signature": post.headers["X-Zimage-Signature"],
        }
        assert verify_signature(f"{mine}-secret".encode(), **signed)
        assert not verify_signature(f"{theirs}-secret".encode(), **signed)
    [row] = outbox.deliveries("cms-1")
    assert (row.state, row.publisher) == (DeliveryState.DELIVERED, "cms-publisher")
    # `audit show` says whose route each delivery took.
    env = {"ZIMAGE_DATABASE__URL": ledger_url}
    shown = CliRunner().invoke(app, ["audit", "show", "cms-1", "--format", "json"], env=env)
    assert shown.exit_code == 0, shown.output
    [listed] = json.loads(shown.output)["deliveries"]
    assert (listed["publisher"], listed["state"]) == ("cms-publisher", "delivered")


def test_a_full_outbox_records_the_delivery_dead(
    engine: Engine, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    outbox = SinkOutbox(engine, max_pending=2)
    worker = dispatcher(outbox, {"webhook": webhook(receiver)}, clock)
    caplog.set_level(logging.ERROR, logger="zimage_pipeline.ledger.outbox")
    for n in (1, 2, 3):
        worker.enqueue_result(f"full-{n}", result_event(f"full-{n}"))
    worker.enqueue_result("full-3", result_event("full-3"))  # already recorded: no new line

    assert [r.fields["request_id"] for r in caplog.records] == ["full-3"]  # type: ignore[attr-defined]

    [refused] = outbox.deliveries("full-3")
    assert (refused.state, refused.attempts) == (DeliveryState.DEAD, 0)
    assert refused.last_error == "outbox full (2 pending)"
    assert worker.run_once() == 2
    assert sorted(json.loads(r.body)["request_id"] for r in receiver.requests) == [
        "full-1",
        "full-2",
    ]
    worker.enqueue_result("full-4", result_event("full-4"))  # room again
    assert outbox.deliveries("full-4")[0].state is DeliveryState.PENDING
    # One result for several sinks: each row counts against the bound.
    outbox.enqueue("full-5", result_event("full-5"), ["a", "b", "c"], now=clock())
    states = {r.sink: r.state for r in outbox.deliveries("full-5")}
    assert states == {"a": DeliveryState.PENDING, "b": DeliveryState.DEAD, "c": DeliveryState.DEAD}


def test_a_sink_no_longer_configured_ends_dead_after_its_attempts(engine: Engine) -> None:
    clock = Clock()
    outbox = SinkOutbox(engine, uniform=highest)
    outbox.enqueue("req-5", result_event("req-5"), ["retired"], now=clock())
    worker = dispatcher(
        outbox, {}, clock, default_policy=RetryPolicy(max_attempts=2, backoff_base_s=1)
    )

    assert worker.run_once() == 1
    assert outbox.deliveries("req-5")[0].state is DeliveryState.PENDING
    clock.advance(1)
    assert worker.run_once() == 1
    [row] = outbox.deliveries("req-5")
    assert (row.state, row.attempts, row.last_error) == (DeliveryState.DEAD, 2, NOT_CONFIGURED)


def test_a_late_failure_report_does_not_move_a_row_claimed_again(engine: Engine) -> None:
    outbox = SinkOutbox(engine)
    outbox.enqueue("req-6", result_event("req-6"), ["webhook"], now=START)
    [slow] = outbox.claim_due(START, limit=10, lease_s=5)
    later = START + timedelta(seconds=6)  # the slow worker's lease ran out
    [fast] = outbox.claim_due(later, limit=10, lease_s=5)
    assert (slow.attempt, fast.attempt) == (1, 2)

    reported = outbox.failed(
        slow.delivery_id,
        "timeout",
        max_attempts=1,
        backoff_base_s=1,
        backoff_max_s=1,
        now=later,
        lease_until=slow.lease_until,
    )

    assert reported is None
    [row] = outbox.deliveries("req-6")
    assert (row.state, row.next_attempt_at, row.last_error) == (
        DeliveryState.PENDING,
        fast.lease_until,
        None,
    )
    assert outbox.claim_due(later, limit=10, lease_s=5) == []  # the fast claim holds
    assert outbox.delivered(fast.delivery_id, now=later)
    assert not outbox.delivered(slow.delivery_id, now=later)  # settled already


def test_prune_removes_finished_rows_only(engine: Engine, receiver: Receiver) -> None:
    clock = Clock()
    outbox = SinkOutbox(engine, max_pending=1)
    worker = dispatcher(outbox, {"webhook": webhook(receiver)}, clock)
    worker.enqueue_result("old-1", result_event("old-1"))
    worker.run_once()  # delivered at START
    worker.enqueue_result("old-2", result_event("old-2"))  # pending
    worker.enqueue_result("old-3", result_event("old-3"))  # dead: full

    assert outbox.prune(START) == 0  # finished at START, not before
    assert outbox.prune(START + timedelta(seconds=1)) == 2
    assert [r.request_id for r in (*outbox.deliveries("old-1"), *outbox.deliveries("old-2"))] == [
        "old-2"
    ]
    assert outbox.deliveries("old-3") == []
