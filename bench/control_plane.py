"""Control-plane load benchmark: everything but the GPU, on the real local services.

Workers run the real service with the real adapters (PostgreSQL ledger, slapd with a warm
cache, SeaweedFS, RabbitMQ), except the engine and encoder: a stub "generates" in a fixed
time and hands over a fixed 1.5 MB payload (a 1024x1024 PNG's size), so what is measured
is the control plane: decode, idempotency, authorize, reserve, upload, commit, audit,
publish, ack.

    python bench/control_plane.py --requests 1000 --workers 2 --generate-ms 0

Measurements in one run:
- references on the same services: a raw 1.5 MB S3 PUT (boto3, no checksum, no
  condition) and an empty PostgreSQL commit, p50, so the overhead can be read against
  what the services themselves cost on this machine;
- latency: requests sent one at a time through one in-process worker; overhead =
  end-to-end time (publish to result received) minus the stub's generation time, p50/p99,
  with the time per phase and per ledger call; then the same series with the Store port
  replaced by one that keys and hashes but does not PUT (StoreWithoutServer), a
  decomposition: how much of the overhead is everything but the object store's PUT;
- saturated: 60 requests published at once to one worker whose stub takes an H100's time
  per image (0.82 s): the share of wall time the engine thread generates, and the gaps
  between generations (the time the GPU would wait for the control plane);
- throughput: all requests published at once to 1 and then N real worker processes
  (bench/cp_worker.py: the production worker, stub engine, 0 ms), completed requests per
  second, and each worker process's CPU time per request (from /proc): the control plane's
  cost on one core, independent of how many processes share this machine's two cores.
Needs `scripts/services.sh up` and `source .local/zimage.env`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.cp_worker import PAYLOAD, StubEncoder, StubEngine  # noqa: E402
from tests.integration.worker_harness import (  # noqa: E402
    client,
    delete_private_topology,
    private_settings,
    running_worker,
)
from zimage_pipeline.ledger import migrate  # noqa: E402
from zimage_pipeline.ledger.db import create_ledger_engine  # noqa: E402
from zimage_pipeline.ledger.quota import QuotaLedger  # noqa: E402
from zimage_pipeline.messages import GenerationRequest  # noqa: E402
from zimage_pipeline.ports import (  # noqa: E402
    EncodedDerived,
    EncodedImage,
    StoredObjectRef,
    StoredOutputs,
)
from zimage_pipeline.settings import Settings, load_settings  # noqa: E402
from zimage_pipeline.storage import ObjectStore, audit_record_key, image_key, wire  # noqa: E402
from zimage_pipeline.storage.keys import rendition_key  # noqa: E402
from zimage_pipeline.wiring import build  # noqa: E402
from zimage_pipeline.wiring.outputs import EXTENSIONS  # noqa: E402

USER = "cms-publisher"


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


class StoreWithoutServer:
    """The Store port without the object store's own work, for one decomposition series
    only: keys and SHA-256 digests as S3Store computes them, no PUT. The headline
    latency uses the real S3Store; this series says how much of it is everything else."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def store(
        self,
        *,
        request: GenerationRequest,
        created_at: datetime,
        images: Sequence[EncodedImage],
        audit_record: Mapping[str, Any],
        first_attempt: bool = False,
        derived: Sequence[EncodedDerived] = (),  # renditions (bench/plugin_cost.py)
    ) -> StoredOutputs:
        refs = [
            StoredObjectRef(
                "bench",
                image_key(self._prefix, created_at, request.request_id, i, "png"),
                None,
                wire.sha256_digests(image.data)[0],
                len(image.data),
            )
            for i, image in enumerate(images)
        ]
        derived_refs = [
            StoredObjectRef(
                "bench",
                rendition_key(
                    self._prefix,
                    created_at,
                    request.request_id,
                    d.source_index,
                    d.name,
                    EXTENSIONS[d.format],
                ),
                None,
                wire.sha256_digests(d.data)[0],
                len(d.data),
            )
            for d in derived
        ]
        record_key = audit_record_key(self._prefix, created_at, request.request_id)
        return StoredOutputs(images=refs, audit_record_key=record_key, derived=derived_refs)

    def discard(self, *, request_id: str, created_at: datetime) -> list[str]:
        return []


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


def references(settings: Settings, rounds: int = 40) -> dict[str, float]:
    """What the services cost by themselves on this machine, in this run."""
    store = ObjectStore(settings.storage)
    prefix = f"{settings.storage.prefix}/reference"
    put: list[float] = []
    for i in range(rounds):
        started = time.perf_counter()
        store.client.put_object(Bucket=settings.storage.bucket, Key=f"{prefix}/{i}", Body=PAYLOAD)
        put.append(time.perf_counter() - started)
    ledger = create_ledger_engine(settings.database)
    commit: list[float] = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            with ledger.begin() as connection:
                connection.execute(text("select 1"))
            commit.append(time.perf_counter() - started)
    finally:
        ledger.dispose()
    return {
        "s3_raw_put_1_5MB_ms_p50": ms(statistics.median(put)),
        "postgres_empty_transaction_ms_p50": ms(statistics.median(commit)),
    }


async def one_at_a_time(
    settings: Settings,
    ports: Any,
    cms: Any,
    args: argparse.Namespace,
    calls: dict[str, list[float]],
    tag: str,
) -> dict[str, Any]:
    """Requests one at a time through one in-process worker: overhead = publish to
    result received, minus the stub's generation time; per phase and per ledger call."""
    stub_s = args.generate_ms / 1000
    overheads: list[float] = []
    phases: dict[str, list[float]] = {}
    async with running_worker(settings, ports, worker_id=f"bench-{tag}"):
        for i in range(args.latency_requests + 5):
            if i == 5:
                calls.clear()  # warm-up over: connections, caches
            rid = f"{tag}-{i}"
            started = time.perf_counter()
            await cms.publish(request(rid))
            result = await cms.result_of(rid, wait_s=60)
            elapsed = time.perf_counter() - started
            assert result["status"] == "succeeded", result
            if i >= 5:
                overheads.append(elapsed - stub_s)
                for phase, seconds in result["timings_s"].items():
                    phases.setdefault(phase, []).append(seconds)
    return {
        "requests": len(overheads),
        "stub_generate_ms": args.generate_ms,
        "overhead_ms_p50": ms(statistics.median(overheads)),
        "overhead_ms_p99": ms(pct(overheads, 0.99)),
        "phase_ms_p50": {k: ms(statistics.median(v)) for k, v in phases.items()},
        "calls_ms_p50_and_count": {k: [ms(statistics.median(v)), len(v)] for k, v in calls.items()},
    }


def engine_busy(intervals: list[tuple[float, float]], generate_ms: float) -> dict[str, Any]:
    """The share of wall time the engine thread was generating, first start to last end,
    and the gaps between one generation's end and the next one's start."""
    intervals = sorted(intervals)
    wall = intervals[-1][1] - intervals[0][0]
    busy = sum(end - start for start, end in intervals)
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(intervals)]
    return {
        "requests": len(intervals),
        "stub_generate_ms": generate_ms,
        "engine_busy_share": round(busy / wall, 4),
        "gap_ms_p50": ms(statistics.median(gaps)),
        "gap_ms_p99": ms(pct(gaps, 0.99)),
        "gap_ms_max": ms(max(gaps)),
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ready(port: int, process: subprocess.Popen[bytes], wait_s: float = 120) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bench worker exited {process.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"bench worker on {port} not ready")


async def throughput(
    settings: Settings, cms: Any, workers: int, requests: int, tag: str
) -> dict[str, Any]:
    """`requests` published at once to `workers` real worker processes (0 ms stub)."""
    processes: list[subprocess.Popen[bytes]] = []
    logs = ROOT / ".local" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for n in range(workers):
            port = free_port()
            overrides = {
                "broker": settings.broker.model_dump(mode="json"),
                "database": {"url": settings.database.url},
                "storage": {"prefix": settings.storage.prefix},
                "engine": settings.engine.model_dump(mode="json"),
                "worker": {
                    **settings.worker.model_dump(mode="json"),
                    "worker_id": f"bench-{tag}-{n}",
                    "http_port": port,
                },
            }
            env = {**os.environ, "ZIMAGE_BENCH_OVERRIDES": json.dumps(overrides)}
            with (logs / f"bench-{tag}-{n}.log").open("wb") as log_file:
                processes.append(
                    subprocess.Popen(  # noqa: ASYNC220 (a start, not a wait)
                        [sys.executable, str(ROOT / "bench" / "cp_worker.py")],
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )
            await ready(port, processes[-1])
        cpu_before = [cpu_seconds(p.pid) for p in processes]
        started = time.perf_counter()
        for i in range(requests):
            await cms.publish(request(f"tp-{tag}-{i}"))
        for _ in range(requests):
            result = await cms.next_result(wait_s=120)
            assert result["status"] == "succeeded", result
        wall = time.perf_counter() - started
        cpu = [cpu_seconds(p.pid) - b for p, b in zip(processes, cpu_before, strict=True)]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    total_rate = requests / wall
    cpu_per_request = sum(cpu) / requests
    return {
        "requests": requests,
        "workers": workers,
        "wall_s": round(wall, 2),
        "requests_per_s_total": round(total_rate, 1),
        "requests_per_s_per_worker": round(total_rate / workers, 1),
        "worker_cpu_ms_per_request": ms(cpu_per_request),
        "requests_per_s_per_worker_core": round(1 / cpu_per_request, 1),
    }


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
    ledger.dispose()
    reference = references(settings)
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
            # Latency: one request at a time through one worker; then the same without the
            # object store's PUT (decomposition only).
            latency = await one_at_a_time(settings, ports, cms, args, calls, "lat")
            store_free = replace(ports, store=StoreWithoutServer(settings.storage.prefix))
            without_put = await one_at_a_time(settings, store_free, cms, args, {}, "nostore")
            # Saturated queue, one worker, a GPU-like generation time: does the "GPU" (the
            # engine thread) ever wait for the control plane?
            gpu = StubEngine(args.saturated_generate_ms / 1000)
            async with running_worker(settings, replace(ports, engine=gpu), worker_id="bench-s"):
                for i in range(args.saturated_requests):
                    await cms.publish(request(f"sat-{i}"))
                for _ in range(args.saturated_requests):
                    result = await cms.next_result(wait_s=120)
                    assert result["status"] == "succeeded", result
            saturated = engine_busy(gpu.intervals, args.saturated_generate_ms)
            runs = [await throughput(settings, cms, 1, args.requests, "w1")]
            if args.workers > 1:
                runs.append(
                    await throughput(settings, cms, args.workers, args.requests, f"w{args.workers}")
                )
    finally:
        for close in wiring.closers:
            close()
        await delete_private_topology(settings)
    h100_images_per_s = args.h100_images_per_s
    return {
        "benchmark": "control_plane",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared; services on the same host)",
        "services": "RabbitMQ 3.10, PostgreSQL 15 ledger, slapd (warm cache), SeaweedFS",
        "payload_bytes": len(PAYLOAD),
        "references": reference,
        "latency": latency,
        "latency_without_the_store_put": {
            **without_put,
            "note": "decomposition only: the Store port keyed and hashed, no PUT (StoreWithoutServer)",
        },
        "saturated_one_worker": saturated,
        "throughput": runs,
        "h100_images_per_s": h100_images_per_s,
        "ratio_per_worker_core_vs_one_h100": round(
            runs[0]["requests_per_s_per_worker_core"] / h100_images_per_s, 1
        ),
        "ratio_per_worker_vs_one_h100": [
            round(r["requests_per_s_per_worker"] / h100_images_per_s, 1) for r in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--generate-ms", type=float, default=100.0)
    parser.add_argument("--saturated-requests", type=int, default=60)
    parser.add_argument(
        "--saturated-generate-ms",
        type=float,
        default=820.0,
        help="per-request generation time in the saturated run (H100, batch 4: ~0.82 s/image)",
    )
    parser.add_argument(
        "--h100-images-per-s",
        type=float,
        default=1.26,
        help="one H100's rate, lossless default engine (bench/results/turbo_h100_r4.md, batch 4)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "control_plane.json"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
