"""A PostgreSQL ledger whose server dropped a pooled connection: the next use reconnects.

The worker's engine pings a connection only when it sat idle in the pool (db.py); one
dropped while in use a moment ago fails its first statement, and run_write/run_read run
their work again once on a new connection."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from zimage_pipeline.ledger.db import PING_AFTER_IDLE_S, create_ledger_engine
from zimage_pipeline.ledger.txn import run_read, run_write
from zimage_pipeline.settings import DatabaseSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_ledger_engine(DatabaseSettings(url=postgres_url, pool_size=1))
    yield engine
    engine.dispose()


def backend_pid(connection: Connection) -> int:
    return int(connection.execute(text("select pg_backend_pid()")).scalar_one())


def drop_server_side(postgres_url: str, pid: int) -> None:
    """What a server restart does to one pooled connection."""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            assert conn.execute(text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
    finally:
        admin.dispose()
    time.sleep(0.2)  # the backend is gone before the client notices


def test_an_idle_dropped_connection_is_replaced_at_checkout(
    engine: Engine, postgres_url: str
) -> None:
    first = run_read(engine, backend_pid)
    drop_server_side(postgres_url, first)
    time.sleep(PING_AFTER_IDLE_S + 0.1)
    with engine.connect() as connection:  # no retry here: the checkout ping must find it
        assert backend_pid(connection) != first


def test_a_connection_dropped_between_uses_is_retried_once(
    engine: Engine, postgres_url: str
) -> None:
    first = run_read(engine, backend_pid)
    drop_server_side(postgres_url, first)  # within the idle window: no ping
    assert run_write(engine, backend_pid) != first
    second = run_read(engine, backend_pid)
    drop_server_side(postgres_url, second)
    assert run_read(engine, backend_pid) != second
