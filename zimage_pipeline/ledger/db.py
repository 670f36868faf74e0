"""Engine construction for the ledger: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError

from zimage_pipeline.settings import DatabaseSettings

PING_AFTER_IDLE_S = 1.0


def database_url(settings: DatabaseSettings) -> URL:
    """The configured URL with the password (kept out of the URL setting) filled in."""
    url = make_url(settings.url)
    password = settings.resolved_password()
    if password is not None:
        url = url.set(password=password.get_secret_value())
    return url


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create_ledger_engine(settings: DatabaseSettings) -> Engine:
    url = database_url(settings)
    if is_sqlite(url):
        return _sqlite_engine(url, timeout_s=settings.connect_timeout_s)
    engine = create_engine(
        url,
        pool_size=settings.pool_size,
        connect_args={"connect_timeout": max(1, int(settings.connect_timeout_s))},
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float = PING_AFTER_IDLE_S) -> None:
    """SQLAlchemy's `pool_pre_ping`, but only for a connection that sat in the pool for
    more than `idle_s`: a ping is a round trip, and a worker checks a connection out four
    times per request. A server restarted while a connection was idle is found here, and
    the pool quietly opens a new one; one that dies while in use fails its statement,
    which txn.run_write retries once on a new connection."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at <= idle_s:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError("ledger connection lost while idle") from exc


def _sqlite_engine(url: URL, *, timeout_s: float) -> Engine:
    if url.database and url.database != ":memory:":
        from pathlib import Path

        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers (audit queries) run beside the writing workers; foreign keys
        # are off by default in SQLite.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        cursor.close()

    return engine
