"""Benchmark: the control plane of one request, authorize + reserve, on PostgreSQL.

authorize = directory lookup with a warm cache (LdapDirectory against the local slapd) +
resolve_policy (the shipped config/policy.toml) + the roles snapshot the job stores;
reserve = QuotaLedger.reserve (user + team counters locked, checked, charged, entry
written), on a throwaway PostgreSQL database next to $ZIMAGE_TEST_POSTGRES_URL, with the
engine the worker uses (create_ledger_engine). The reservations are then committed
(timed too). Users rotate over the seed directory's generators, so the team budget row of
design-team is shared by several of them. A second run reserves from 4 threads at once
(the worker's I/O pool) to show lock contention; a third runs the same on SQLite.

    set -a; source .local/zimage.env; set +a
    .venv/bin/python bench/identity_quota.py [--requests 2000]

Writes bench/results/identity_quota.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from zimage_pipeline.directory import LdapDirectory
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.policy import EffectivePolicy, QuotaLimits, TeamBudget, resolve_policy
from zimage_pipeline.settings import DatabaseSettings, Settings, load_settings

USERS = ["alice", "bob", "jurgen", "paren(thesis)", "star*name", "back\\slash"]
UNLIMITED = QuotaLimits(images_per_day=10**9, images_per_month=10**9)


def stats_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)

    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def authorize(directory: LdapDirectory, settings: Settings, user: str) -> EffectivePolicy:
    policy = resolve_policy(directory.lookup(user), settings.policy)
    policy.to_snapshot()  # the worker stores it with the job
    return policy


def one_request(
    directory: LdapDirectory, settings: Settings, ledger: QuotaLedger, user: str
) -> tuple[float, float, float, str]:
    request_id = f"bench-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    policy = authorize(directory, settings, user)
    t1 = time.perf_counter()
    ledger.reserve(
        request_id=request_id,
        user=policy.username,
        # The policy's team rows, with budgets the benchmark cannot exhaust.
        teams=[TeamBudget(t.group, 10**9, 10**9) for t in policy.teams],
        images=1,
        user_limits=UNLIMITED,
        lease_s=900,
    )
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0, request_id


def run(
    directory: LdapDirectory, settings: Settings, engine: Engine, requests: int, threads: int
) -> dict[str, Any]:
    ledger = QuotaLedger(engine)
    for i in range(50):  # warm the pool, the counters and the statement caches
        _a, _r, _t, rid = one_request(directory, settings, ledger, USERS[i % len(USERS)])
        ledger.commit(rid, 1)
    work: Callable[[int], tuple[float, float, float, str]] = lambda i: one_request(  # noqa: E731
        directory, settings, ledger, USERS[i % len(USERS)]
    )
    start = time.perf_counter()
    if threads == 1:
        results = [work(i) for i in range(requests)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(work, range(requests)))
    wall = time.perf_counter() - start
    commits = []
    for *_times, rid in results:
        t = time.perf_counter()
        ledger.commit(rid, 1)
        commits.append(time.perf_counter() - t)
    return {
        "threads": threads,
        "requests_per_s": round(requests / wall, 1),
        "authorize": stats_ms([r[0] for r in results]),
        "reserve": stats_ms([r[1] for r in results]),
        "authorize_plus_reserve": stats_ms([r[2] for r in results]),
        "commit": stats_ms(commits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/identity_quota.json"))
    args = parser.parse_args()
    settings = load_settings()
    directory = LdapDirectory(settings.directory)
    for user in USERS:
        directory.lookup(user)  # warm cache: the benchmark measures the hot path

    base = make_url(os.environ["ZIMAGE_TEST_POSTGRES_URL"])
    name = f"zimage_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    runs: dict[str, Any] = {}
    try:
        url = base.set(database=name).render_as_string(hide_password=False)
        engine = create_ledger_engine(DatabaseSettings(url=url, pool_size=8))
        migrate.upgrade(engine)
        runs["postgresql_sequential"] = run(directory, settings, engine, args.requests, 1)
        runs["postgresql_4_threads"] = run(directory, settings, engine, args.requests, 4)
        with engine.connect() as conn:
            pg_version = conn.scalar(text("SHOW server_version"))
        engine.dispose()
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = create_ledger_engine(DatabaseSettings(url=f"sqlite:///{tmp}/bench.db"))
            migrate.upgrade(sqlite)
            runs["sqlite_sequential"] = run(directory, settings, sqlite, args.requests, 1)
            sqlite.dispose()
    finally:
        directory.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    for label, result in runs.items():
        both = result["authorize_plus_reserve"]
        print(
            f"{label:<24} authorize p50 {result['authorize']['p50_ms']:>7} ms   "
            f"reserve p50 {result['reserve']['p50_ms']:>7} ms   "
            f"both p50 {both['p50_ms']:>7} p99 {both['p99_ms']:>7} ms   "
            f"{result['requests_per_s']} req/s"
        )
    document = {
        "benchmark": "identity_quota",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgresql": pg_version,
        },
        "aim": "authorize + reserve p50 < 5 ms on PostgreSQL",
        "runs": runs,
        "note": (
            "authorize = warm-cache LdapDirectory.lookup + resolve_policy + to_snapshot; "
            "reserve = QuotaLedger.reserve of 1 image for the user and its teams; "
            "users rotate over 6 seed accounts; 50 warm-up requests per run not counted."
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
