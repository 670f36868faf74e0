"""`worker --devices`: the supervisor of one worker process per GPU (worker/supervisor.py),
with cheap stand-in children that report their environment and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.worker.supervisor import (
    Supervisor,
    child_specs,
    parse_devices,
    worker_command,
)

# A stand-in worker: writes what it was given to <dir>/<pid>.json, and on SIGTERM writes
# <dir>/<pid>.drained and exits 0 (or ignores SIGTERM with IGNORE_TERM=1).
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    def drain(*_):
        (out / f"{os.getpid()}.drained").write_text("ok")
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE_TERM") else drain)
    keys = ("CUDA_VISIBLE_DEVICES", "ZIMAGE_WORKER__WORKER_ID", "ZIMAGE_WORKER__HTTP_PORT",
            "ZIMAGE_ENGINE__DEVICE", "INHERITED")
    (out / f"{os.getpid()}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    while True:
        time.sleep(0.05)
    """
)


def _command(out: Path) -> list[str]:
    return [sys.executable, "-c", CHILD, str(out)]


def _reports(out: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem): json.loads(p.read_text()) for p in out.glob("*.json") if p.stat().st_size}


def _drained(out: Path) -> set[int]:
    return {int(p.stem) for p in out.glob("*.drained")}


async def _until(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_devices_parse_and_bad_lists_are_named() -> None:
    assert parse_devices("0,1") == [0, 1]
    assert parse_devices(" 3, 1 ") == [3, 1]
    for bad, word in [("", "expected"), ("0,,1", "expected"), ("0,a", "'a'"), ("1,1", "twice")]:
        with pytest.raises(ConfigError, match=word):
            parse_devices(bad)
    with pytest.raises(ConfigError, match="-1"):
        parse_devices("-1")


def test_each_child_gets_its_gpu_port_and_worker_id() -> None:
    specs = child_specs([0, 3], base_port=9464, host="gpu-host")
    assert [(s.device, s.worker_id, s.http_port) for s in specs] == [
        (0, "gpu-host-gpu0", 9464),
        (3, "gpu-host-gpu3", 9467),  # base + GPU index, as the systemd unit computes it
    ]
    assert specs[1].env == {
        "CUDA_VISIBLE_DEVICES": "3",
        "ZIMAGE_WORKER__WORKER_ID": "gpu-host-gpu3",
        "ZIMAGE_WORKER__HTTP_PORT": "9467",
    }
    # A configured worker id is the prefix; a CUDA device becomes the child's only one.
    (spec,) = child_specs([1], base_port=9464, worker_id="render-a", engine_device="cuda:1")
    assert spec.worker_id == "render-a-gpu1"
    assert spec.env["ZIMAGE_ENGINE__DEVICE"] == "cuda:0"
    # The health server off stays off; a port past 65535 is refused by name.
    assert child_specs([0, 1], base_port=0, host="h")[1].http_port == 0
    with pytest.raises(ConfigError, match="65535"):
        child_specs([2], base_port=65534, host="h")
    assert worker_command("/etc/zimage/zimage.toml")[-4:] == [
        "zimage_pipeline.cli",
        "worker",
        "--config",
        "/etc/zimage/zimage.toml",
    ]


async def test_two_children_then_a_killed_one_restarts_alone_then_stop_drains(
    tmp_path: Path,
) -> None:
    supervisor = Supervisor(
        child_specs([0, 1], base_port=9500, host="h"),
        _command(tmp_path),
        grace_s=10,
        base_env={**os.environ, "INHERITED": "yes"},
        backoff_s=0.2,
    )
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    await _until(lambda: len(_reports(tmp_path)) == 2)
    reports = _reports(tmp_path)
    by_gpu = {r["CUDA_VISIBLE_DEVICES"]: r for r in reports.values()}
    assert by_gpu["0"]["ZIMAGE_WORKER__WORKER_ID"] == "h-gpu0"
    assert by_gpu["1"]["ZIMAGE_WORKER__WORKER_ID"] == "h-gpu1"
    assert (by_gpu["0"]["ZIMAGE_WORKER__HTTP_PORT"], by_gpu["1"]["ZIMAGE_WORKER__HTTP_PORT"]) == (
        "9500",
        "9501",
    )
    assert all(r["INHERITED"] == "yes" for r in reports.values())  # the rest is passed on
    first = supervisor.pids()
    assert set(reports) == {first[0], first[1]}

    os.kill(first[1], signal.SIGKILL)  # as a fatal CUDA error ends one GPU's worker
    await _until(lambda: supervisor.pids()[1] not in (None, first[1]))
    await _until(lambda: len(_reports(tmp_path)) == 3)
    second = supervisor.pids()
    assert second[0] == first[0]  # the other GPU's worker was not touched
    assert supervisor.restarts() == {0: 0, 1: 1}
    assert _reports(tmp_path)[second[1]]["CUDA_VISIBLE_DEVICES"] == "1"  # same GPU again

    supervisor.stop()
    assert await asyncio.wait_for(running, 20) == 0
    assert _drained(tmp_path) == {second[0], second[1]}


async def test_a_child_that_ignores_the_drain_is_killed_after_the_grace(tmp_path: Path) -> None:
    supervisor = Supervisor(
        child_specs([0], base_port=0, host="h"),
        _command(tmp_path),
        grace_s=0.5,
        base_env={**os.environ, "IGNORE_TERM": "1"},
    )
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    await _until(lambda: len(_reports(tmp_path)) == 1)
    supervisor.stop()
    started = time.monotonic()
    assert await asyncio.wait_for(running, 20) == 1  # not a clean drain
    assert time.monotonic() - started < 10
    assert supervisor.pids() == {0: None}


# A stand-in whose worker on the GPUs listed in BROKEN exits 2 at once, as a worker does
# when its configuration cannot work (a missing model directory, a bad policy file).
BROKEN_CHILD = CHILD.replace(
    "while True:",
    "if os.environ['CUDA_VISIBLE_DEVICES'] in os.environ['BROKEN'].split(','):\n"
    "    sys.exit(2)\n"
    "while True:",
)


def _broken_on(gpus: str, out: Path) -> Supervisor:
    return Supervisor(
        child_specs([0, 1], base_port=0, host="h"),
        [sys.executable, "-c", BROKEN_CHILD, str(out)],
        grace_s=10,
        base_env={**os.environ, "BROKEN": gpus},
        backoff_s=0.05,
    )


async def test_a_configuration_error_is_not_restarted_the_other_gpu_keeps_serving(
    tmp_path: Path,
) -> None:
    supervisor = _broken_on("1", tmp_path)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    await _until(lambda: len(_reports(tmp_path)) == 2)
    await _until(lambda: supervisor.pids()[1] is None)
    await asyncio.sleep(1.0)  # twenty backoffs: a restart would have come by now
    assert len(_reports(tmp_path)) == 2, "GPU 1's worker was started again"
    assert supervisor.restarts() == {0: 0, 1: 0}
    assert not running.done() and supervisor.pids()[0] is not None  # GPU 0 still serves
    supervisor.stop()
    assert await asyncio.wait_for(running, 20) == 0  # GPU 0 drained cleanly


async def test_when_every_worker_has_a_configuration_error_the_supervisor_exits_2(
    tmp_path: Path,
) -> None:
    supervisor = _broken_on("0,1", tmp_path)
    assert await asyncio.wait_for(supervisor.run(handle_signals=False), 20) == 2
    assert len(_reports(tmp_path)) == 2  # each started once, neither restarted
    assert supervisor.restarts() == {0: 0, 1: 0}


# The supervisor as its own process, stopped by a signal as systemd or a terminal would.
PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from zimage_pipeline.worker.supervisor import Supervisor, child_specs
    out, child = sys.argv[1], sys.argv[2]
    supervisor = Supervisor(
        child_specs([0, 1], base_port=0, host="h"),
        [sys.executable, "-c", child, out],
        grace_s=20,
    )
    sys.exit(asyncio.run(supervisor.run()))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_supervisor_drains_every_child_and_exits_zero(
    tmp_path: Path, sig: signal.Signals
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path), CHILD],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 30
        while len(_reports(tmp_path)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        children = set(_reports(tmp_path))
        parent.send_signal(sig)
        assert parent.wait(timeout=30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
    assert _drained(tmp_path) == children
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_worker_without_the_gpu_stack_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from zimage_pipeline import extras
    from zimage_pipeline.cli import app

    monkeypatch.setattr(extras, "GPU_MODULES", ("json", "zimage_no_such_module"))
    assert extras.missing_gpu_modules() == ["zimage_no_such_module"]
    for args in (["worker"], ["worker", "--devices", "0,1"], ["model", "make-tiny", "x"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "zimage_no_such_module is not installed" in result.output
        assert '"zimage-pipeline[gpu]"' in result.output


def test_a_worker_whose_configuration_cannot_work_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The code the supervisor reads as "do not restart": a policy file that is not there
    # is found while wiring the worker, after the settings loaded fine.
    from typer.testing import CliRunner

    from zimage_pipeline.cli import app

    config = tmp_path / "zimage.toml"
    config.write_text('[policy]\nfile = "missing-policy.toml"\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["worker", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "missing-policy.toml" in result.output
    assert "Traceback" not in result.output
