"""Case 4: PostgreSQL restarts in the middle of a stream. Requests caught by it are
retried (delay queue) and complete once the database is back: none lost, none charged
twice. The database is a private cluster, so the restart disturbs nobody else."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants
from tests.integration.fault_matrix.private_postgres import PrivatePostgres
from tests.integration.fault_matrix.stack import (
    CountingEngine,
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.worker_harness import client, running_worker

pytestmark = pytest.mark.integration

STREAM = 10


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.init()
        yield server
    finally:
        server.remove()


async def test_postgres_restart_mid_stream_loses_and_doubles_nothing(
    tiny_model: Path, private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    settings = matrix_settings(tiny_model, private_postgres.url, database={"connect_timeout_s": 2})
    ids = [f"pg-{i}" for i in range(STREAM)]
    async with (
        case_stack(settings) as (tap, _),
        wired(settings) as wiring,
        client(settings, "alice") as alice,
    ):
        slowed = CountingEngine(wiring.ports.engine, delay_s=0.3)  # keeps the stream in flight
        ports = replace(wiring.ports, engine=slowed)
        async with running_worker(settings, ports, worker_id="ledgered"):
            for rid in ids:
                await alice.publish(request(rid))
            await wait_until(lambda: sum(bool(tap.of(r)) for r in ids) >= 2, "two answers")

            private_postgres.stop()
            await wait_until(
                lambda: "transient failure, retrying" in caplog.text,
                "a request to meet the outage and be sent to retry",
            )
            private_postgres.start()
            await tap.wait_for(*ids, timeout_s=90)
    assert {tap.first(r)["status"] for r in ids} == {"succeeded"}
    assert "LEDGER_UNAVAILABLE" in caplog.text or "ledger unavailable" in caplog.text
    # Every request charged once and stored once, whatever it was doing at the restart.
    assert_invariants(settings, tap, expected=set(ids))
