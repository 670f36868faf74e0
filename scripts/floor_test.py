"""The dependency floors, proven: install the LOWEST versions pyproject.toml allows for
the runtime dependencies (not the gpu extra) into a throwaway venv and run the control
plane's unit tests (settings, messages and decoding, policy, ledger and quota on SQLite,
the storage adapter's botocore configuration, the audit chain and anchors, the worker's
scheduler, gauges and supervisor) against them.

Slow (minutes: a fresh venv, downloads) and needs a package index, so it is not part of
scripts/test.sh; run it after changing a floor, and commit its log:

    python -m pip install uv        # anywhere; uv resolves the lowest versions
    python scripts/floor_test.py    # writes bench/results/floor_test.txt

It uses `uv pip install --resolution lowest-direct`: each direct dependency at its floor,
their own dependencies at the newest that fit (what a careful installer could get).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# The dev extra's test runners and the libraries unit tests import (not floors under test).
TEST_TOOLS = [
    "pytest>=8",
    "pytest-asyncio>=0.23",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "jsonschema>=4.18",
]
# The engine's unit tests need the gpu extra, which the floor venv leaves out.
TESTS = ["tests/unit", "--ignore=tests/unit/engine"]


def _run(command: list[str], log: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    log.append("$ " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    return done  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uv", default=shutil.which("uv") or "uv", help="the uv executable")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/floor_test.txt")
    parser.add_argument("--keep", action="store_true", help="keep the venv (its path is logged)")
    args = parser.parse_args()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    direct = [Requirement(r) for r in project["dependencies"]]
    log: list[str] = [
        f"# scripts/floor_test.py, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, Python "
        f"{sys.version.split()[0]}",
    ]
    work = Path(tempfile.mkdtemp(prefix="zimage-floor-"))
    venv = work / "venv"
    python = venv / "bin" / "python"
    env = {**os.environ, "UV_CACHE_DIR": str(work / "uv-cache"), "VIRTUAL_ENV": str(venv)}
    ok = False
    try:
        steps = [
            [args.uv, "venv", "--python", sys.executable, str(venv)],
            [args.uv, "pip", "install", "--python", str(python), "--resolution",
             "lowest-direct", "-e", str(ROOT)],
            [args.uv, "pip", "install", "--python", str(python), *TEST_TOOLS],
        ]  # fmt: skip
        for step in steps:
            done = _run(step, log, env=env)
            if done.returncode != 0:
                log += [done.stdout, done.stderr, "RESULT: FAILED to install"]
                return 1
        frozen = _run([args.uv, "pip", "freeze", "--python", str(python)], log, env=env).stdout
        installed = {
            canonicalize_name(line.split("==")[0]): line.split("==")[1]
            for line in frozen.splitlines()
            if "==" in line
        }
        log.append("\n## Direct runtime dependencies: the floor allowed -> installed")
        for requirement in direct:
            name = canonicalize_name(requirement.name)
            log.append(f"{requirement!s:32} -> {name}=={installed.get(name, 'MISSING')}")
        gpu = [n for n in ("torch", "diffusers", "transformers", "accelerate") if n in installed]
        log.append(f"GPU stack installed: {gpu or 'none'}")
        log.append("\n## Everything installed\n" + frozen.strip())
        started = time.monotonic()
        tests = _run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            log,
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)},
        )
        summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
        log.append(f"\n## Unit tests ({time.monotonic() - started:.0f} s): {summary}")
        if tests.returncode != 0:
            log.append(tests.stdout[-20000:] + tests.stderr[-5000:])
        ok = tests.returncode == 0 and not gpu
        log.append(f"RESULT: {'PASSED' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        if args.keep:
            log.append(f"(venv kept at {venv})")
        else:
            shutil.rmtree(work, ignore_errors=True)
        # No machine's paths in a committed log.
        text = "\n".join(log) + "\n"
        for path, name in ((str(work), "<tmp>"), (work.name, "<tmp>"), (str(ROOT), "<checkout>"),
                           (sys.executable, "python"), (args.uv, "uv"),
                           (sys.base_prefix, "<python>")):  # fmt: skip
            text = text.replace(path, name)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print("\n".join(line for line in log if not line.startswith("$")).split("## Everything")[0])
        print(f"log: {args.output}")


if __name__ == "__main__":
    sys.exit(main())
