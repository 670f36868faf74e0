"""Control-plane load benchmark: everything but the GPU, on the real local services.

Workers run the real service with the real adapters (PostgreSQL ledger, slapd with a warm
cache, SeaweedFS, RabbitMQ), except the engine and encoder: a stub "generates" in a fixed
time and hands over a fixed 1.5 MB payload (a 1024x1024 PNG's size), so what is measured
is the control plane: decode, idempotency, authorize, reserve, upload, commit, audit,
publish, ack.

    python bench/control_plane.py --requests 1000 --workers 2 --generate-ms 0

Two measurements in one run:
- latency: requests sent one at a time; overhead = end-to-end time minus the stub's
  generation time (p50/p99);
- throughput: all requests published at once to N workers with a 0 ms stub; completed
  requests per second per worker = the most the control plane sustains.
Needs `scripts/services.sh up` and `source .local/zimage.env`. Not part of the test suite.
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
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tests.integration.worker_harness import (  # noqa: E402
    client,
    delete_private_topology,
    private_settings,
    running_worker,
)
from zimage_pipeline.ledger import migrate  # noqa: E402
from zimage_pipeline.ledger.db import create_ledger_engine  # noqa: E402
from zimage_pipeline.ledger.quota import QuotaLedger  # noqa: E402
from zimage_pipeline.messages import ImageFormat  # noqa: E402
from zimage_pipeline.ports import EncodedImage, ModelIdentity, RawImage  # noqa: E402
from zimage_pipeline.settings import load_settings  # noqa: E402
from zimage_pipeline.wiring import build  # noqa: E402

PAYLOAD = os.urandom(1_500_000)  # incompressible: what a 1024x1024 photo PNG weighs
USER = "cms-publisher"


class StubEngine:
    def __init__(self, generate_s: float) -> None:
        self.generate_s = generate_s
        self._pixels = Image.new("RGB", (1024, 1024))

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity("stub/z-image", None, "0" * 64)

    def generate(self, specs: Any) -> list[RawImage]:
        if self.generate_s:
            time.sleep(self.generate_s)
        return [RawImage(self._pixels, s.seed, 1024, 1024, i) for i, s in enumerate(specs)]


class StubEncoder:
    def encode(self, image: RawImage, **_: Any) -> EncodedImage:
        return EncodedImage(PAYLOAD, ImageFormat.PNG, image.width, image.height, image.seed)


class Timed:
    """Wraps a port and accumulates the time spent in each of its methods."""

    def __init__(self, inner: Any, name: str, totals: dict[str, list[float]]) -> None:
        self._inner, self._name, self._totals = inner, name, totals

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._inner, attr)
        if not callable(target):
            return target

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                key = f"{self._name}.{attr}"
                self._totals.setdefault(key, []).append(time.perf_counter() - started)

        return timed


def fresh_database() -> str:
    name = f"zimage_bench_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"create database {name}"], check=True
    )
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def request(rid: str) -> dict[str, Any]:
    return {"request_id": rid, "on_behalf_of": USER, "prompt": "bench", "priority": "standard"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = private_settings(concurrency=4, prefetch=16, max_buffered_per_principal=64)
    settings = load_settings(
        broker=base.broker.model_dump(),
        worker=base.worker.model_dump(),
        database={"url": fresh_database()},
        storage={"prefix": f"bench-{uuid.uuid4().hex[:8]}"},
        engine={"model_path": str(ROOT / ".local" / "models" / "tiny"), "device": "cpu"},
    )
    ledger = create_ledger_engine(settings.database)
    migrate.upgrade(ledger)
    QuotaLedger(ledger).set_limit(
        f"user:{USER}", images_per_day=10**7, images_per_month=10**8, actor="bench"
    )
    wiring = build(settings, warmup=False)
    stub_s = args.generate_ms / 1000
    try:
        calls: dict[str, list[float]] = {}
        ports = replace(
            wiring.ports,
            engine=StubEngine(stub_s),
            encoder=StubEncoder(),
            jobs=Timed(wiring.ports.jobs, "jobs", calls),
            audit=Timed(wiring.ports.audit, "audit", calls),
            ledger=Timed(wiring.ports.ledger, "ledger", calls),
        )
        async with running_worker(settings, ports, worker_id="bench-setup"):
            pass  # declare the topology before the client binds its results queue
        async with client(settings, USER) as cms:
            # Latency: one request at a time through one worker.
            overheads: list[float] = []
            phases: dict[str, list[float]] = {}
            async with running_worker(settings, ports, worker_id="bench-0"):
                for i in range(args.latency_requests + 5):
                    rid = f"lat-{i}"
                    started = time.perf_counter()
                    await cms.publish(request(rid))
                    result = await cms.result_of(rid, wait_s=60)
                    elapsed = time.perf_counter() - started
                    assert result["status"] == "succeeded", result
                    if i >= 5:  # warm-up: connections, caches
                        overheads.append(elapsed - stub_s)
                        for phase, seconds in result["timings_s"].items():
                            phases.setdefault(phase, []).append(seconds)
            # Throughput: everything at once, N workers, no generation time.
            zero = replace(ports, engine=StubEngine(0.0))
            workers = [
                running_worker(settings, zero, worker_id=f"bench-{n + 1}")
                for n in range(args.workers)
            ]
            for w in workers:
                await w.__aenter__()
            try:
                started = time.perf_counter()
                for i in range(args.requests):
                    await cms.publish(request(f"tp-{i}"))
                done = 0
                while done < args.requests:
                    result = await cms.next_result(wait_s=120)
                    assert result["status"] == "succeeded", result
                    done += 1
                wall = time.perf_counter() - started
            finally:
                for w in reversed(workers):
                    await w.__aexit__(None, None, None)
    finally:
        for close in wiring.closers:
            close()
        ledger.dispose()
        await delete_private_topology(settings)
    per_worker = args.requests / wall / args.workers
    return {
        "benchmark": "control_plane",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared; services on the same host)",
        "services": "RabbitMQ 3.10, PostgreSQL 15 ledger, slapd (warm cache), SeaweedFS",
        "payload_bytes": len(PAYLOAD),
        "latency": {
            "requests": len(overheads),
            "stub_generate_ms": args.generate_ms,
            "overhead_ms_p50": round(statistics.median(overheads) * 1000, 2),
            "overhead_ms_p99": round(pct(overheads, 0.99) * 1000, 2),
            "phase_ms_p50": {k: round(statistics.median(v) * 1000, 2) for k, v in phases.items()},
            "ledger_calls_ms_p50_and_count": {
                k: [round(statistics.median(v) * 1000, 2), len(v)] for k, v in calls.items()
            },
        },
        "throughput": {
            "requests": args.requests,
            "workers": args.workers,
            "wall_s": round(wall, 2),
            "requests_per_s_total": round(args.requests / wall, 1),
            "requests_per_s_per_worker": round(per_worker, 1),
        },
        "h100_images_per_s": round(1 / 0.888, 2),
        "ratio_per_worker_vs_one_h100": round(per_worker / (1 / 0.888), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--generate-ms", type=float, default=100.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "control_plane.json"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
