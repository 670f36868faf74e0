"""Engine construction for the ledger: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from zimage_pipeline.settings import DatabaseSettings


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
    return create_engine(
        url,
        pool_size=settings.pool_size,
        pool_pre_ping=True,
        connect_args={"connect_timeout": max(1, int(settings.connect_timeout_s))},
    )


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
