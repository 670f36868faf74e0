"""A private PostgreSQL for the case that restarts the database: its own cluster (initdb
into a temporary directory), its own port, loopback only, so restarting it disturbs
nobody else. Modelled on private_slapd.py. The Debian binaries refuse to run as root, so
as root the server runs as the `postgres` account, in a directory that account owns."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.integration.fault_matrix.procs import free_port

DATABASE = "zimage"


def _bin_dir() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail(
            "no PostgreSQL server binaries in /usr/lib/postgresql: run scripts/services.sh up"
        )
    return found[-1].parent


class PrivatePostgres:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="zimage-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def init(self) -> None:
        # Trust on loopback: a throwaway cluster that only this test's processes reach.
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **self._as,
        )
        self.start()
        admin = create_engine(self._admin_url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
        finally:
            admin.dispose()

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.root),  # its socket stays in its own directory
                "-c",
                "fsync=off",
            ],
            stdout=log,
            stderr=log,
            **self._as,
        )
        log.close()
        # Ready when it answers a query, not merely when the port opens (it refuses
        # connections while it starts up).
        admin = create_engine(self._admin_url(), connect_args={"connect_timeout": 1})
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"private postgres exited:\n{self.log()[-2000:]}")
                try:
                    with admin.connect() as conn:
                        conn.execute(text("SELECT 1"))
                    return
                except OperationalError:
                    time.sleep(0.1)
        finally:
            admin.dispose()
        pytest.fail("private postgres did not start answering")

    def _admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Fast shutdown (what a service restart does): clients are disconnected, open
        transactions rolled back."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
