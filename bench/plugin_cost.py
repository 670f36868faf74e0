"""What each built-in plugin adds to a request's control-plane latency, same tree, same run.

    python bench/plugin_cost.py --rounds 4 --requests 150

Issue 15 bounded the stages' cost *without* plugins (bench/stage_overhead.py); this
measures it *with* them. Each configuration runs `bench/control_plane.py`'s latency
series (one request at a time through one in-process worker, the real ledger, broker
and directory, a stub engine) in a fresh process, the configurations in a rotating order
each round, and reports the median over rounds of each one's p50 overhead and its
difference from its reference:

- `none` / `deny_list` / `webhook`: the stub encoder (a fixed 1.5 MB payload) and the
  Store port without the PUT (keys and digests only: the PUT alone is ~16 ms of noise
  here). `deny_list` checks every prompt against a 200-word list and 20 patterns;
  `webhook` queues each result in the ledger's outbox before the ack (the POST is the
  periodic job's, which this in-process harness does not run: the measured cost is
  the queueing, which is all the request waits for).
- `png` / `renditions`: the real encoder (PNG with XMP and C2PA, as configured) on a
  1024x1024 noise image (the encoders' worst case), with and without two renditions
  (a 400 px WebP thumbnail and a 1200x628 JPEG crop). Uploads are left out as above;
  each rendition's PUT would add its own (a few hundred KB each).

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
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("none", "deny_list", "webhook", "png", "renditions")
# Which configuration each one is compared with.
REFERENCE = {"deny_list": "none", "webhook": "none", "renditions": "png"}

DENY_LIST = {
    "enabled": True,
    "rules": [
        {"id": "house-words", "words": [f"forbidden-word-{i}" for i in range(200)]},
        {"id": "patterns", "patterns": [rf"\bcompetitor{i}\s*corp\b" for i in range(20)]},
    ],
}
RENDITIONS = {
    "enabled": True,
    "default": ["thumb", "social"],
    "presets": {
        "thumb": {"width": 400, "fit": "fit", "format": "webp"},
        "social": {"width": 1200, "height": 628, "fit": "crop", "format": "jpeg"},
    },
}


class _Accepting(BaseHTTPRequestHandler):
    """A webhook receiver that answers 204 to everything."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def plugins_for(config: str, receiver_url: str) -> dict[str, Any]:
    if config == "deny_list":
        return {"deny_list": DENY_LIST}
    if config == "webhook":
        return {"webhook": {"enabled": True, "urls": [receiver_url], "secret": "bench"}}
    if config == "renditions":
        return {"renditions": RENDITIONS}
    return {}


def child(config: str, requests: int) -> dict[str, Any]:
    """One configuration's latency series, in this process."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    import bench.control_plane as cp
    from tests.integration.worker_harness import client, private_settings, running_worker

    # The webhook's configuration needs a URL; nothing is POSTed to it in this series.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accepting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver_url = f"http://127.0.0.1:{server.server_address[1]}/hook"

    base = private_settings(concurrency=4, prefetch=16, max_buffered_per_principal=64)
    settings = cp.load_settings(
        broker=base.broker.model_dump(),
        worker=base.worker.model_dump(),
        database={"url": cp.fresh_database()},
        storage={"prefix": f"bench-plugins-{uuid.uuid4().hex[:8]}"},
        engine={"model_path": str(ROOT / ".local" / "models" / "tiny"), "device": "cpu"},
        plugins=plugins_for(config, receiver_url),
    )
    ledger = cp.create_ledger_engine(settings.database)
    cp.migrate.upgrade(ledger)
    cp.QuotaLedger(ledger).set_limit(
        f"user:{cp.USER}", images_per_day=10**7, images_per_month=10**8, actor="bench"
    )
    ledger.dispose()
    wiring = cp.build(settings, warmup=False)
    real_encoder = config in ("png", "renditions")
    noise = Image.effect_noise((1024, 1024), 64).convert("RGB") if real_encoder else None
    engine = cp.StubEngine(0.0, pixels=noise)
    ports = replace(
        wiring.ports,
        engine=engine,
        encoder=wiring.ports.encoder if real_encoder else cp.StubEncoder(),
        store=cp.StoreWithoutServer(settings.storage.prefix),
    )
    args = argparse.Namespace(latency_requests=requests, generate_ms=0.0)

    async def series() -> dict[str, Any]:
        async with running_worker(settings, ports, worker_id="bench-setup"):
            pass  # declare the topology before the client binds its results queue
        async with client(settings, cp.USER) as cms:
            measured: dict[str, Any] = await cp.one_at_a_time(
                settings, ports, cms, args, {}, config
            )
            return measured

    try:
        return asyncio.run(series())
    finally:
        for close in wiring.closers:
            close()
        asyncio.run(cp.delete_private_topology(settings))
        server.shutdown()


def run_child(config: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        config,
        "--requests",
        str(args.requests),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {config} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "plugin_cost.json")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.requests)))
        return
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    for n in range(args.rounds):
        # Rotate the order, so a drift of the machine over the run falls on all alike.
        order = CONFIGS[n % len(CONFIGS) :] + CONFIGS[: n % len(CONFIGS)]
        measured = {config: run_child(config, args) for config in order}
        rounds.append(measured)
        print(
            f"round {n + 1}: "
            + ", ".join(f"{c} {measured[c]['overhead_ms_p50']} ms" for c in CONFIGS),
            flush=True,
        )
    p50 = {c: round(statistics.median(r[c]["overhead_ms_p50"] for r in rounds), 2) for c in CONFIGS}
    result: dict[str, Any] = {
        "benchmark": "plugin_cost",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (services on the same host)",
        "head": head,
        "rounds": args.rounds,
        "requests_per_series": args.requests,
        "wall_s": round(time.monotonic() - started, 1),
        "p50_overhead_ms_median": p50,
        "p50_ms_per_round": {c: [r[c]["overhead_ms_p50"] for r in rounds] for c in CONFIGS},
        "added_p50_ms": {c: round(p50[c] - p50[ref], 2) for c, ref in REFERENCE.items()},
        "added_ratio": {c: round(p50[c] / p50[ref], 3) for c, ref in REFERENCE.items()},
        "phase_ms_p50_last_round": {c: rounds[-1][c]["phase_ms_p50"] for c in CONFIGS},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
