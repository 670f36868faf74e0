"""Worker subprocesses for the cases that kill or signal a worker: real processes, so a
`kill -9` is a real one (the broker sees the TCP connection die, nothing runs a
`finally`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.conftest import PROJECT_ROOT
from tests.integration.fault_matrix.stack import overrides_of, wait_until
from zimage_pipeline.settings import Settings

READY_TIMEOUT_S = 120.0  # imports torch and loads the tiny model: ~10 s, more when busy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        worker_id: str,
        faults: Mapping[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        overrides = overrides_of(settings)
        overrides["worker"].update({"worker_id": worker_id, "http_port": self.port})
        env = dict(os.environ)
        env.update(
            {
                "ZIMAGE_FAULT_OVERRIDES": json.dumps(overrides),
                "ZIMAGE_FAULT": json.dumps(dict(faults or {})),
                "ZIMAGE_LOGGING__JSON_LOGS": "true",
            }
        )
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.fault_matrix.fault_worker"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"worker exited {self.process.returncode} before it was ready:\n{self.log()[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                status_line = sock.recv(64).split(b"\r\n", 1)[0]
                return b" 200 " in status_line + b" "
        except OSError:
            return False

    async def wait_ready(self) -> None:
        """Its /readyz says it consumes (warm, topology declared)."""
        await wait_until(self._ready, f"worker {self.pid} ready", timeout_s=READY_TIMEOUT_S)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout_s: float = 60.0) -> int:
        await wait_until(
            lambda: self.process.poll() is not None,
            f"worker {self.pid} to exit",
            timeout_s=timeout_s,
        )
        return int(self.process.returncode)

    def stop(self) -> None:
        """Cleanup: whatever state it is in, it is gone afterwards."""
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=30)
        finally:
            self._log.close()


async def exited_with(worker: WorkerProcess, code: int, *, timeout_s: float = 60.0) -> None:
    rc = await worker.wait_exit(timeout_s)
    assert rc == code, f"worker exited {rc}, expected {code}:\n{worker.log()[-3000:]}"
