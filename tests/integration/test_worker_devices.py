"""`zimage-pipeline worker --devices 0,1` on this CPU-only host: two real workers on the
tiny model, each told its "GPU" (CUDA_VISIBLE_DEVICES, which a CPU host must tolerate),
its own port and worker id; one killed is restarted alone; SIGTERM drains both."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.integration.test_end_to_end import _worker_env, e2e_settings
from tests.integration.worker_harness import client, delete_private_topology
from zimage_pipeline.engine.tiny import make_tiny_model
from zimage_pipeline.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _free_port_pair() -> int:
    """A base port with base and base + 1 free."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base >= 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two consecutive free ports")


def _env(settings: Settings, base_port: int) -> dict[str, str]:
    env = _worker_env(settings)  # the private topology, ledger, model and prefix
    env.update(
        {
            # auto: the worker must pick the CPU although CUDA_VISIBLE_DEVICES names a GPU.
            "ZIMAGE_ENGINE__DEVICE": "auto",
            "ZIMAGE_WORKER__HTTP_PORT": str(base_port),
            "ZIMAGE_WORKER__WORKER_ID": "devtest",
            "ZIMAGE_WORKER__SHUTDOWN_GRACE_S": "10",
        }
    )
    return env


def _children(parent: int) -> dict[str, int]:
    """CUDA_VISIBLE_DEVICES -> pid of each live child of `parent`, read from /proc."""
    found: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent or fields[0] == "Z":
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for entry in environ:
            if entry.startswith(b"CUDA_VISIBLE_DEVICES="):
                found[entry.split(b"=", 1)[1].decode()] = int(stat.parent.name)
    return found


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


async def _serve(settings: Settings, *, count: int) -> None:
    async with client(settings, "alice") as alice:
        ids = [f"devices-{n}" for n in range(count)]
        for request_id in ids:
            await alice.publish(
                {
                    "request_id": request_id,
                    "on_behalf_of": "alice",
                    "prompt": "a lighthouse",
                    "width": 128,
                    "height": 128,
                    "steps": 2,
                }
            )
        for request_id in ids:
            result = await alice.result_of(request_id, wait_s=120)
            assert result["status"] == "succeeded", result


def _metric(port: int, series: str) -> float:
    """One series' value on a worker's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = [x for x in text.splitlines() if x.startswith(f"{series} ")]
    return float(found[0].split()[1]) if found else 0.0


def _wait(predicate: object, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def supervised(
    tmp_path: Path, sqlite_url: str
) -> Iterator[tuple[Settings, subprocess.Popen[bytes], int, Path]]:
    model = make_tiny_model(tmp_path / "tiny")
    settings = e2e_settings(model, sqlite_url)
    base = _free_port_pair()
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        parent = subprocess.Popen(
            [sys.executable, "-m", "zimage_pipeline.cli", "worker", "--devices", "0,1"],
            cwd=PROJECT_ROOT,
            env=_env(settings, base),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield settings, parent, base, log
    finally:
        if parent.poll() is None:
            for pid in _children(parent.pid).values():
                os.kill(pid, signal.SIGKILL)
            parent.kill()
            parent.wait(timeout=30)
        asyncio.run(delete_private_topology(settings))


def test_two_pinned_workers_one_restarted_alone_then_drained(
    supervised: tuple[Settings, subprocess.Popen[bytes], int, Path],
) -> None:
    settings, parent, base, log = supervised

    def both_ready() -> bool:
        assert parent.poll() is None, log.read_text()
        return _status(base, "/readyz") == 200 and _status(base + 1, "/readyz") == 200

    _wait(both_ready, "both workers ready")
    first = _children(parent.pid)
    assert set(first) == {"0", "1"}
    text = log.read_text()
    host = "devtest"
    assert f"worker {host}-gpu0 starting" in text and f"worker {host}-gpu1 starting" in text

    # Requests are served by the pair through the real stack; each worker counts its own
    # images on its own port.
    asyncio.run(_serve(settings, count=4))
    ports = (base, base + 1)
    images = [_metric(port, "zimage_images_total") for port in ports]
    assert sum(images) == 4, images
    # The gauges behind the dashboard and the anchor alert, from the real wiring.
    waits = [_metric(p, 'zimage_queue_wait_seconds_count{priority="standard"}') for p in ports]
    assert sum(waits) == 4, waits
    for port in ports:
        assert _metric(port, "zimage_audit_anchor_interval_seconds") == 300.0
        assert 0 <= _metric(port, "zimage_audit_anchor_age_seconds") < 300
    design = 'team="cn=design-team,ou=groups,dc=example,dc=org",window="day"'
    assert _metric(base, f"zimage_team_quota_limit_images{{{design}}}") >= 200

    # GPU 1's worker dies (as on a fatal CUDA error): it alone comes back.
    os.kill(first["1"], signal.SIGKILL)
    _wait(lambda: _children(parent.pid).get("1") not in (None, first["1"]), "GPU 1 restarted")
    _wait(lambda: _status(base + 1, "/readyz") == 200, "GPU 1 ready again")
    assert _children(parent.pid)["0"] == first["0"]
    assert "exited -9" in log.read_text()

    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=90) == 0, log.read_text()
    text = log.read_text()
    assert text.count("stopped (exit 0)") == 2, text  # each worker drained and said so
    assert _children(parent.pid) == {}
