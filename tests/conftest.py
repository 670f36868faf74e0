"""Shared fixtures.

Integration tests talk to the real local services started by `scripts/services.sh up`,
whose settings reach the tests through the ZIMAGE_* variables in .local/zimage.env
(`scripts/test.sh` sources it). A service that cannot be reached fails the test with a
message naming it: nothing here ever skips.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: start the local services with `scripts/services.sh up` "
            "and `source .local/zimage.env` (scripts/test.sh does both)"
        )
    return value


def require_port(name: str, port: int, host: str = "127.0.0.1") -> None:
    try:
        with socket.create_connection((host, port), timeout=3):
            return
    except OSError as exc:
        pytest.fail(f"{name} is not reachable on {host}:{port} ({exc}); run scripts/services.sh up")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards.

    A database per test keeps concurrent test runs (and helpers) from seeing each
    other's rows.
    """
    base = make_url(require_env("ZIMAGE_TEST_POSTGRES_URL"))
    require_port("PostgreSQL", base.port or 5432, base.host or "127.0.0.1")
    name = f"zimage_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Each ledger test runs on both backends."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))
