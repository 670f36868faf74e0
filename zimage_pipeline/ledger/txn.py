"""Write transactions that serialize correctly on SQLite and PostgreSQL, with retries.

SQLite: a write transaction starts with `BEGIN IMMEDIATE`, taking the database's write
lock before the first read. With the default deferred BEGIN, two writers that both read
first deadlock on the lock upgrade and one fails at once with "database is locked", which
the busy timeout cannot help. Only these write transactions take the lock; readers stay
concurrent under WAL. Lock contention beyond the busy timeout is retried here with
backoff and never reaches the user; after `deadline_s` it becomes a RETRY error.

PostgreSQL: the callers take row locks (SELECT ... FOR UPDATE in a fixed order) or use
conditional UPDATEs; a deadlock or serialization failure is retried the same way.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from zimage_pipeline.errors import DependencyUnavailable, Disposition

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_DEADLINE_S = 30.0
_RETRYABLE_PG_CODES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


class LedgerUnavailableError(DependencyUnavailable):
    """The ledger database cannot be reached or stayed locked: retry the request later."""

    disposition = Disposition.RETRY
    reason = "LEDGER_UNAVAILABLE"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back naive; everything the ledger writes is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def upsert_insert(connection: Connection, table: Table) -> pg.Insert | sqlite.Insert:
    """INSERT with ON CONFLICT support (`on_conflict_do_nothing/_update`) in the
    connection's dialect: both backends have it, with the same arguments we use."""
    return dialect_insert(connection.dialect.name, table)


def dialect_insert(dialect: str, table: Table) -> pg.Insert | sqlite.Insert:
    """`upsert_insert` by dialect name: for statements built once per dialect and cached
    (building a statement costs more Python time than its round trip on the hot path)."""
    return sqlite.insert(table) if dialect == "sqlite" else pg.insert(table)


def _contention(exc: DBAPIError) -> bool:
    if isinstance(exc, OperationalError) and "database is locked" in str(exc.orig):
        return True
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code in _RETRYABLE_PG_CODES


def run_write(
    engine: Engine,
    work: Callable[[Connection], T],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> T:
    """Run `work` in one write transaction; commit on return, roll back on any error.

    `work` must be safe to run again from the start (each attempt is a new transaction).
    A unique-constraint violation is retried once: a concurrent writer inserted the same
    key, and the second run of `work` finds that row and takes its idempotent path.
    """
    give_up_at = time.monotonic() + deadline_s
    delay_s = 0.005
    integrity_retries = reconnect_retries = 1
    while True:
        committing = False
        try:
            with engine.connect() as connection:
                if is_sqlite(engine):
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                result = work(connection)
                committing = True
                connection.commit()
                return result
        except IntegrityError:
            if integrity_retries == 0:
                raise
            integrity_retries -= 1
        except DBAPIError as exc:
            # A pooled connection the server dropped (restart, failover) fails its first
            # statement; the transaction died with it, so it runs again on a new one.
            # Not when the commit itself failed: it may have been applied.
            if exc.connection_invalidated and not committing and reconnect_retries > 0:
                reconnect_retries -= 1
                continue
            if _contention(exc) and time.monotonic() < give_up_at:
                time.sleep(delay_s * (0.5 + random.random()))  # noqa: S311 (jitter, not crypto)
                delay_s = min(delay_s * 2, 0.5)
                continue
            if _contention(exc) or exc.connection_invalidated or isinstance(exc, OperationalError):
                log.warning("ledger: unavailable: %s", type(exc.orig).__name__)
                raise LedgerUnavailableError(
                    f"ledger unavailable: {type(exc.orig).__name__}"
                ) from exc
            raise


def run_read(engine: Engine, work: Callable[[Connection], T]) -> T:
    for reconnect in (True, False):
        try:
            with engine.connect() as connection:
                return work(connection)
        except OperationalError as exc:
            if reconnect and exc.connection_invalidated:
                continue  # a dropped pooled connection (see run_write): once more
            raise LedgerUnavailableError(f"ledger unavailable: {type(exc.orig).__name__}") from exc
    raise AssertionError("unreachable")
