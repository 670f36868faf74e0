"""The systemd template unit for hosts without Kubernetes (deploy/systemd): one worker
per GPU, each with its GPU, health port and worker id, restarted alone."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from zimage_pipeline.cli import app
from zimage_pipeline.settings import Settings, WorkerSettings
from zimage_pipeline.worker.runner import HANG_EXIT_MARGIN_S

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "zimage-worker@.service"


def _entries() -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows repeated keys."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def _service(key: str) -> list[str]:
    return [v for s, k, v in _entries() if s == "Service" and k == key]


def _environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _service("Environment"):
        name, _, val = value.partition("=")
        env[name] = val
    return env


def _expand(text: str, instance: str) -> str:
    # The specifiers the unit uses, and `$$` (a literal `$`).
    return text.replace("%i", instance).replace("%H", "gpuhost").replace("$$", "$")


def test_each_instance_pins_its_gpu_and_has_its_own_id() -> None:
    env = _environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "%i"
    assert env["ZIMAGE_ENGINE__DEVICE"] == "cuda:0"  # the only device it sees
    assert "%i" in env["ZIMAGE_WORKER__WORKER_ID"]
    for name in env:
        if not name.startswith("ZIMAGE_") or name in {"ZIMAGE_CONFIG", "ZIMAGE_HTTP_PORT_BASE"}:
            continue
        section, _, key = name.removeprefix("ZIMAGE_").lower().partition("__")
        assert key in type(Settings.model_fields[section].default).model_fields, name


def test_each_instance_gets_its_own_health_port(tmp_path: Path) -> None:
    (exec_start,) = _service("ExecStart")
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/bin/sh", "-c"]
    script = argv[2]
    binary = re.search(r"exec (\S+) worker$", script)
    assert binary is not None and Path(binary.group(1)).name == "zimage-pipeline"
    assert CliRunner().invoke(app, ["worker", "--help"]).exit_code == 0
    # Run the unit's shell line with a stand-in for the worker that prints what it got.
    fake = tmp_path / "zimage-pipeline"
    fake.write_text('#!/bin/sh\necho "$ZIMAGE_WORKER__HTTP_PORT $*"\n', encoding="utf-8")
    fake.chmod(0o755)
    base = _environment()["ZIMAGE_HTTP_PORT_BASE"]
    assert int(base) == WorkerSettings().http_port
    ports = []
    for gpu in ("0", "1", "7"):
        line = _expand(script, gpu).replace(binary.group(1), str(fake))
        result = subprocess.run(
            ["/bin/sh", "-c", line],
            env={"ZIMAGE_HTTP_PORT_BASE": base, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        port, command = result.stdout.split(maxsplit=1)
        assert command.strip() == "worker"
        ports.append(int(port))
    assert ports == [int(base), int(base) + 1, int(base) + 7]


def test_restarts_alone_and_stops_after_the_drain() -> None:
    assert _service("Restart") == ["on-failure"]  # exit 70 (fatal CUDA error) restarts it
    assert _service("KillSignal") == ["SIGTERM"]  # the drain
    (timeout,) = _service("TimeoutStopSec")
    assert int(timeout) > WorkerSettings().shutdown_grace_s + HANG_EXIT_MARGIN_S
    assert "%i" in UNIT.read_text(encoding="utf-8")
    assert UNIT.name.endswith("@.service")  # a template: one instance per GPU
