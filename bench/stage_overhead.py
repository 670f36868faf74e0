"""The plugin stages' cost without plugins: this tree against a baseline commit, same run.

    python bench/stage_overhead.py --baseline 65fb6ee --rounds 4 --requests 200

Issue 15's bound: the stage driver adds no more than 1 ms to the control plane's p50
overhead when no plugin is enabled. The baseline commit (before the plugin stages) is
checked out into a temporary git worktree; each round runs the latency series of
`bench/control_plane.py` (one request at a time through one in-process worker, the real
adapters, a stub engine of `--generate-ms`) once in each tree, in alternating order, each
in a fresh process whose `zimage_pipeline`, `bench` and `tests` come from that tree. Two
series per process: with the real S3 PUT, and with the Store port keyed and hashed but
no PUT (less noise: the PUT alone is about 16 ms here). The result is the median over the
rounds of each tree's p50, and the difference. Needs `scripts/services.sh up` and
`source .local/zimage.env`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child(tree: Path, requests: int, generate_ms: float) -> dict[str, Any]:
    """One tree's latency series, in this process (imports from `tree` only)."""
    sys.path.insert(0, str(tree))
    import bench.control_plane as cp
    import zimage_pipeline
    from tests.integration.worker_harness import client, private_settings, running_worker

    for module in (cp, zimage_pipeline):
        if not Path(module.__file__ or "").resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"{module.__name__} imported from {module.__file__}, not {tree}")
    base = private_settings(concurrency=4, prefetch=16, max_buffered_per_principal=64)
    settings = cp.load_settings(
        broker=base.broker.model_dump(),
        worker=base.worker.model_dump(),
        database={"url": cp.fresh_database()},
        storage={"prefix": f"bench-stage-{uuid.uuid4().hex[:8]}"},
        engine={"model_path": str(ROOT / ".local" / "models" / "tiny"), "device": "cpu"},
    )
    ledger = cp.create_ledger_engine(settings.database)
    cp.migrate.upgrade(ledger)
    cp.QuotaLedger(ledger).set_limit(
        f"user:{cp.USER}", images_per_day=10**7, images_per_month=10**8, actor="bench"
    )
    ledger.dispose()
    wiring = cp.build(settings, warmup=False)
    args = argparse.Namespace(latency_requests=requests, generate_ms=generate_ms)
    ports = replace(
        wiring.ports, engine=cp.StubEngine(generate_ms / 1000), encoder=cp.StubEncoder()
    )

    async def series() -> dict[str, Any]:
        async with running_worker(settings, ports, worker_id="bench-setup"):
            pass  # declare the topology before the client binds its results queue
        async with client(settings, cp.USER) as cms:
            real = await cp.one_at_a_time(settings, ports, cms, args, {}, "lat")
            no_put = replace(ports, store=cp.StoreWithoutServer(settings.storage.prefix))
            bare = await cp.one_at_a_time(settings, no_put, cms, args, {}, "nostore")
        return {"with_put": real, "without_put": bare}

    try:
        return asyncio.run(series())
    finally:
        for close in wiring.closers:
            close()
        asyncio.run(cp.delete_private_topology(settings))


def run_child(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(tree),
        "--requests",
        str(args.requests),
        "--generate-ms",
        str(args.generate_ms),
    ]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child in {tree.name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(rounds: list[dict[str, Any]], tree: str, series: str) -> dict[str, Any]:
    p50s = [r[tree][series]["overhead_ms_p50"] for r in rounds]
    p99s = [r[tree][series]["overhead_ms_p99"] for r in rounds]
    return {
        "p50_ms_per_round": p50s,
        "p50_ms_median": round(statistics.median(p50s), 2),
        "p99_ms_median": round(statistics.median(p99s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default="65fb6ee", help="the commit before the stages")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--generate-ms", type=float, default=0.0)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "stage_overhead.json"
    )
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.requests, args.generate_ms)))
        return
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--", "zimage_pipeline"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zimage-baseline-") as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(baseline), args.baseline],
            cwd=ROOT,
            check=True,
        )
        try:
            for n in range(args.rounds):
                # Alternate the order, so a drift of the machine over the run falls on
                # both trees alike.
                order = [("baseline", baseline), ("head", ROOT)]
                if n % 2:
                    order.reverse()
                measured = {name: run_child(tree, args) for name, tree in order}
                rounds.append(measured)
                print(
                    f"round {n + 1}: "
                    + ", ".join(
                        f"{name} p50 {m['with_put']['overhead_ms_p50']} ms "
                        f"({m['without_put']['overhead_ms_p50']} ms without the PUT)"
                        for name, m in measured.items()
                    ),
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False
            )
    result: dict[str, Any] = {
        "benchmark": "stage_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (services on the same host)",
        "baseline": args.baseline,
        "head": head + ("+uncommitted" if dirty else ""),
        "plugins_enabled": [],
        "rounds": args.rounds,
        "requests_per_series": args.requests,
        "stub_generate_ms": args.generate_ms,
        "wall_s": round(time.monotonic() - started, 1),
    }
    for series in ("with_put", "without_put"):
        base_s = summary(rounds, "baseline", series)
        head_s = summary(rounds, "head", series)
        result[series] = {
            "baseline": base_s,
            "head": head_s,
            "p50_difference_ms": round(head_s["p50_ms_median"] - base_s["p50_ms_median"], 2),
        }
    result["raw"] = rounds
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
