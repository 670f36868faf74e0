"""`zimage-pipeline worker --devices 0,1,...`: one worker process per GPU on one host.

A process supervisor for a multi-GPU host without Kubernetes, nothing more: it starts
one `zimage-pipeline worker` child per listed GPU and keeps each running. It is not a
scheduler; the broker spreads the work. Where systemd is at hand, the template unit
deploy/systemd/zimage-worker@.service does the same with the init system's own
supervision, and on Kubernetes each pod is one worker (docs/deploy.md).

Each child gets, in its environment before it imports torch:
- CUDA_VISIBLE_DEVICES=<N>: it sees only its GPU (as cuda:0);
- ZIMAGE_WORKER__WORKER_ID=<worker_id or host name>-gpu<N>;
- ZIMAGE_WORKER__HTTP_PORT=<worker.http_port> + N (health, readiness, metrics; 0 keeps
  the server off), the scheme of the systemd unit, so a GPU keeps its port whichever
  way its worker is started;
- ZIMAGE_ENGINE__DEVICE=cuda:0 where engine.device names a CUDA device (a `cuda:1` of the
  whole host would not exist in a child that sees one GPU); `auto` and `cpu` are kept.

A child that exits while the supervisor is not stopping (a fatal CUDA error or a hung
generation exits 70) is restarted alone, after a backoff that doubles from
`backoff_s` up to `max_backoff_s` and starts over once a child has run for
`stable_after_s`; the other children are not touched. A child that exits 2 (a
configuration error: the same configuration fails the same way again) is not restarted;
when no child is left running, the supervisor exits 2 too, so that systemd or whoever
started it sees the failure instead of a restart loop. SIGTERM or SIGINT to the
supervisor is passed on to every child, each drains (worker.shutdown_grace_s), and a
child still running after `grace_s` is killed. SIGHUP is passed on (templates reload).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from zimage_pipeline.errors import EXIT_CONFIG, ConfigError

log = logging.getLogger(__name__)

MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One GPU's worker: what its process is told in its environment."""

    device: int
    worker_id: str
    http_port: int
    env: Mapping[str, str]


def parse_devices(text: str) -> list[int]:
    """`0,1,3` -> [0, 1, 3]; anything else is a ConfigError naming the problem."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ConfigError(f"--devices {text!r}: expected GPU indexes separated by commas, e.g. 0,1")
    devices: list[int] = []
    for part in parts:
        if not part.isdigit():
            raise ConfigError(
                f"--devices {text!r}: {part!r} is not a GPU index (a non-negative integer, "
                "as nvidia-smi numbers them)"
            )
        if int(part) in devices:
            raise ConfigError(f"--devices {text!r}: GPU {part} is listed twice")
        devices.append(int(part))
    return devices


def child_specs(
    devices: Sequence[int],
    *,
    base_port: int,
    worker_id: str = "",
    engine_device: str = "auto",
    host: str | None = None,
) -> list[ChildSpec]:
    """The children for `devices` (see the module docstring for the scheme)."""
    prefix = worker_id or host or socket.gethostname()
    if base_port and base_port + max(devices) > MAX_PORT:
        raise ConfigError(
            f"worker.http_port {base_port} + GPU {max(devices)} is past port {MAX_PORT}: "
            "choose a lower base port"
        )
    specs = []
    for device in devices:
        port = base_port + device if base_port else 0
        child_id = f"{prefix}-gpu{device}"
        env = {
            "CUDA_VISIBLE_DEVICES": str(device),
            "ZIMAGE_WORKER__WORKER_ID": child_id,
            "ZIMAGE_WORKER__HTTP_PORT": str(port),
        }
        if engine_device.startswith("cuda"):
            env["ZIMAGE_ENGINE__DEVICE"] = "cuda:0"
        specs.append(ChildSpec(device, child_id, port, env))
    return specs


def worker_command(config: str | None) -> list[str]:
    """The child's command: this interpreter running the worker, with the same config."""
    command = [sys.executable, "-m", "zimage_pipeline.cli", "worker"]
    return [*command, "--config", config] if config else command


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    drained_code: int | None = None  # its exit after the stop signal
    given_up: bool = False  # exited with a configuration error: not restarted


class Supervisor:
    """Keeps one process per ChildSpec running until `stop` is set (or a signal)."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        command: Sequence[str],
        *,
        grace_s: float,
        base_env: Mapping[str, str] | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_after_s: float = 60.0,
    ) -> None:
        if not specs:
            raise ConfigError("the supervisor needs at least one device")
        self._children = [_Child(spec) for spec in specs]
        self._command = list(command)
        self._grace_s = grace_s
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._stable_after_s = stable_after_s
        self._stop = asyncio.Event()

    # -- what tests and the log read --------------------------------------------------

    def pids(self) -> dict[int, int | None]:
        """GPU index -> the pid of its running child (None between a crash and restart)."""
        return {
            c.spec.device: c.process.pid
            if c.process is not None and c.process.returncode is None
            else None
            for c in self._children
        }

    def restarts(self) -> dict[int, int]:
        return {c.spec.device: c.restarts for c in self._children}

    def stop(self) -> None:
        self._stop.set()

    # -- running ----------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (or `stop()`); 0 when every running child drained
        cleanly (exit 0), else 1."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        keepers = [
            asyncio.create_task(self._keep(child), name=f"gpu{child.spec.device}")
            for child in self._children
        ]
        try:
            await self._stop.wait()
            log.info("supervisor: stopping %d worker(s)", len(self._children))
            self._forward(signal.SIGTERM)
            _done, pending = await asyncio.wait(keepers, timeout=self._grace_s)
            if pending:
                log.error(
                    "supervisor: %d worker(s) still running after %.0fs; killing them",
                    len(pending),
                    self._grace_s,
                )
                self._forward(signal.SIGKILL)
                await asyncio.wait(pending)
        finally:
            for task in keepers:
                task.cancel()
            for task in keepers:
                with suppress(asyncio.CancelledError):
                    await task
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        if all(c.given_up for c in self._children):
            return EXIT_CONFIG
        drained = {c.spec.device: c.drained_code for c in self._children}
        log.info("supervisor: stopped; the workers' exit codes by GPU: %s", drained)
        return 0 if all(code in (None, 0) for code in drained.values()) else 1

    async def _keep(self, child: _Child) -> None:
        backoff = self._backoff_s
        while not self._stop.is_set():
            process = await self._start(child)
            if self._stop.is_set():  # stopped while it was starting: it missed the signal
                with suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            code = await process.wait()
            child.exit_codes.append(code)
            if self._stop.is_set():
                child.drained_code = code
                return
            if code == EXIT_CONFIG:
                self._give_up(child, process.pid)
                return
            ran_s = time.monotonic() - child.started_at
            if ran_s >= self._stable_after_s:
                backoff = self._backoff_s
            log.error(
                "supervisor: the worker on GPU %d (pid %d) exited %d after %.0fs; "
                "restarting it in %.1fs",
                child.spec.device,
                process.pid,
                code,
                ran_s,
                backoff,
            )
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
            if not self._stop.is_set():
                child.restarts += 1

    def _give_up(self, child: _Child, pid: int) -> None:
        child.given_up = True
        log.critical(
            "supervisor: the worker on GPU %d (pid %d) exited %d, a configuration error; "
            "not restarting it (its own error above says what to fix)",
            child.spec.device,
            pid,
            EXIT_CONFIG,
        )
        if all(c.given_up for c in self._children):
            log.critical("supervisor: no worker left running; exiting %d", EXIT_CONFIG)
            self._stop.set()

    async def _start(self, child: _Child) -> asyncio.subprocess.Process:
        env = {**self._base_env, **child.spec.env}
        # The child's output goes where the supervisor's goes (the journal, the
        # terminal): each worker's lines carry its worker id.
        process = await asyncio.create_subprocess_exec(*self._command, env=env)
        child.process = process
        child.started_at = time.monotonic()
        log.info(
            "supervisor: started the worker %s on GPU %d (pid %d, port %d)",
            child.spec.worker_id,
            child.spec.device,
            child.process.pid,
            child.spec.http_port,
        )
        return process

    def _forward(self, sig: signal.Signals) -> None:
        for child in self._children:
            process = child.process
            if process is not None and process.returncode is None:
                with suppress(ProcessLookupError):
                    process.send_signal(sig)
