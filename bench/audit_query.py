"""Benchmark: compliance queries over 1,000,000 audit events on PostgreSQL.

Builds a throwaway database next to the one in $ZIMAGE_TEST_POSTGRES_URL, migrates it,
bulk-loads a valid hash chain with COPY (about 154,000 requests: published, failed and
denied stories over a year, 2,000 users, 40 groups, 5 models, SKUs and CMS asset ids as
labels, prompts kept; 40 % of them made from one of 40 templates, Zipf-popular, each
template's version moving 1 -> 2 -> 3 over the year), then times the questions
`zimage-pipeline audit query` and `audit show` answer, through the same code
(`query_requests`, `request_story`), and one full `verify_chain`. Writes
bench/results/audit_query.json and drops the database.

    set -a; source .local/zimage.env; set +a
    .venv/bin/python bench/audit_query.py [--events 1000000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from zimage_pipeline.audit import AuditFilter, query_requests, request_story, verify_chain
from zimage_pipeline.audit.chain import canonical, event_hash, split_prompts
from zimage_pipeline.audit.index import template_of
from zimage_pipeline.audit.queries import build_query
from zimage_pipeline.ledger import migrate

START = datetime(2026, 1, 1, tzinfo=UTC)
MODELS = [f"Tongyi-MAI/Z-Image-Turbo@rev{i}" for i in range(5)]
GROUPS = [f"cn=team-{i:02d},ou=groups,dc=example,dc=org" for i in range(40)]
TEMPLATES = [f"preset-{i:02d}" for i in range(40)]
TEMPLATE_WEIGHTS = [1 / (i + 1) for i in range(len(TEMPLATES))]  # preset-00 is ~23 %
TEMPLATED = 0.4  # share of requests made from a template
REQUEST_COLUMNS = (
    "request_id, subject, principal, model, status, reason, first_at, last_at, events, "
    "prompt_sha256, prompt_text, template_id, template_version"
)
EVENT_COLUMNS = (
    "seq, at, request_id, event_type, actor, payload, prompt_text, prev_hash, event_hash"
)


def stories(
    rng: random.Random, total_events: int
) -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]], dict[str, Any]]]:
    n = 0
    made = 0
    expected_requests = total_events / 7
    while made < total_events:
        n += 1
        rid = f"req-{n:08d}"
        user = f"user{rng.randrange(2000):04d}"
        groups = rng.sample(GROUPS, 2)
        model = rng.choice(MODELS)
        roll = rng.random()
        received = {
            "user": user,
            "principal": "cms-publisher",
            "prompt": f"product shot {rng.randrange(10**6)} on a {rng.choice(['red', 'blue', 'white'])} background",
            "labels": {"cms_asset": f"asset-{n}", "sku": f"SKU-{rng.randrange(10_000):05d}"},
        }
        if rng.random() < TEMPLATED:
            # The template's version moves 1 -> 2 -> 3 over the year (thirds of it).
            version = 1 + min(2, int(3 * n / expected_requests))
            received["template"] = {
                "id": rng.choices(TEMPLATES, TEMPLATE_WEIGHTS)[0],
                "version": version,
                "sha256": f"{rng.getrandbits(256):064x}",
                "variables": {"product": f"SKU-{rng.randrange(10_000):05d}", "colour": "white"},
            }
        authorized = {"groups": groups, "roles": ["editor"]}
        if roll < 0.07:
            reason = rng.choice(["QUOTA_EXCEEDED", "NOT_AUTHORIZED"])
            steps = [("received", received), ("denied", {"groups": groups, "reason": reason})]
            meta = {"status": "denied", "reason": reason, "model": None}
        elif roll < 0.15:
            reason = rng.choice(["STORAGE_FAILED", "ENGINE_OOM"])
            steps = [
                ("received", received),
                ("authorized", authorized),
                ("quota_reserved", {"images": 1}),
                ("failed", {"reason": reason, "model": model}),
                ("quota_released", {"images": 1, "reason": reason}),
            ]
            meta = {"status": "failed", "reason": reason, "model": model}
        else:
            steps = [
                ("received", received),
                ("authorized", authorized),
                ("quota_reserved", {"images": 1}),
                (
                    "generated",
                    {"model": model, "seeds": [rng.randrange(2**31)], "timings": {"gpu_s": 1.2}},
                ),
                (
                    "stored",
                    {"keys": [f"zimage/{rid}/0.png"], "sha256": [f"{rng.getrandbits(256):064x}"]},
                ),
                ("quota_committed", {"images": 1}),
                ("published", {}),
            ]
            meta = {"status": "published", "reason": None, "model": model}
        meta.update(user=user, groups=groups, labels=received["labels"], prompt=received["prompt"])
        # What the index folds from the received event (audit/index.py), as the worker would.
        meta["template"] = template_of(received.get("template")) or (None, None)
        made += len(steps)
        yield rid, steps, meta


def load(engine: Engine, total_events: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - synthetic data
    span_s = 365 * 24 * 3600
    prev, seq, requests = "0" * 64, 0, 0
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        with (
            cursor.copy(f"COPY audit_events ({EVENT_COLUMNS}) FROM STDIN") as events,
        ):
            summaries, groups, labels = [], [], []
            for rid, steps, meta in stories(rng, total_events):
                requests += 1
                t = START + timedelta(seconds=span_s * requests / (total_events / 7))
                first_at = t
                prompt_sha = None
                for i, (event_type, payload) in enumerate(steps):
                    seq += 1
                    at = t + timedelta(seconds=i)
                    hashed, prompts = split_prompts(payload)
                    payload_text = canonical(hashed)
                    prompt_sha = prompt_sha or hashed.get("prompt_sha256")
                    digest = event_hash(
                        seq=seq,
                        at=at,
                        request_id=rid,
                        event_type=event_type,
                        actor="worker-1",
                        payload_text=payload_text,
                        prev_hash=prev,
                    )
                    events.write_row(
                        (
                            seq,
                            at,
                            rid,
                            event_type,
                            "worker-1",
                            payload_text,
                            canonical(prompts) if prompts else None,
                            prev,
                            digest,
                        )
                    )
                    prev = digest
                summaries.append(
                    (
                        rid,
                        meta["user"],
                        "cms-publisher",
                        meta["model"],
                        meta["status"],
                        meta["reason"],
                        first_at,
                        at,
                        len(steps),
                        prompt_sha,
                        meta["prompt"],
                        *meta["template"],
                    )
                )
                groups.extend((rid, g) for g in meta["groups"])
                labels.extend((rid, k, v) for k, v in meta["labels"].items())
        for table, columns, rows in (
            ("audit_requests", REQUEST_COLUMNS, summaries),
            ("audit_request_groups", "request_id, group_name", groups),
            ("audit_request_labels", "request_id, key, value", labels),
        ):
            with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        cursor.execute(
            "UPDATE audit_chain_head SET seq = %s, event_hash = %s WHERE id = 1", (seq, prev)
        )
        raw.commit()
    finally:
        raw.close()
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    return {"events": seq, "requests": requests}


RUNS = 21


def timed(fn: Callable[[], Any], runs: int = RUNS) -> dict[str, Any]:
    """The first run apart (cold caches); median (p50) and p95 of runs 2..n."""
    samples, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - start) * 1000)
    warm = sorted(samples[1:])
    return {
        "first_ms": round(samples[0], 2),
        "median_ms": round(statistics.median(warm), 2),
        "p95_ms": round(warm[min(len(warm) - 1, round(0.95 * (len(warm) - 1)))], 2),
        "max_ms": round(max(samples), 2),
        "rows": len(result) if isinstance(result, list) else result,
    }


def plan(engine: Engine, f: AuditFilter) -> list[str]:
    """PostgreSQL's plan of the index query (without the children's lookups): the scan
    nodes, to show which index answers it."""
    sql = build_query(f).compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        lines = [row[0] for row in conn.execute(text(f"EXPLAIN {sql}"))]
    return [line.strip().lstrip("-> ") for line in lines if "Scan" in line]


def queries(engine: Engine) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    def run(f: AuditFilter) -> Callable[[], list[str]]:
        return lambda: [s.request_id for s in query_requests(engine, f)]

    march = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    day = (datetime(2026, 6, 10, tzinfo=UTC), datetime(2026, 6, 11, tzinfo=UTC))
    cases = {
        "user_in_month": AuditFilter(user="user0042", since=march[0], until=march[1]),
        "user_all_time": AuditFilter(user="user0042", limit=None),
        "group_failed": AuditFilter(group=GROUPS[3], status="failed"),
        "reason_in_month": AuditFilter(
            reason="QUOTA_EXCEEDED", since=march[0], until=march[1], limit=None
        ),
        "model_in_month": AuditFilter(model=MODELS[2], since=march[0], until=march[1]),
        "label_sku_any_key": AuditFilter(labels=((None, "SKU-01234"),), limit=None),
        "label_cms_asset": AuditFilter(labels=(("cms_asset", "asset-77777"),)),
        "newest_100": AuditFilter(),
        "prompt_text_in_day": AuditFilter(
            prompt="on a red", since=day[0], until=day[1], limit=None
        ),
        # `audit query --template ID` (issue 16): the most used template's newest 100, a
        # mid one over a month and a rare one over the year without a limit, one version
        # of the most used, and a template with a group.
        "template_newest_100": AuditFilter(template=TEMPLATES[0]),
        "template_in_month": AuditFilter(
            template=TEMPLATES[4], since=march[0], until=march[1], limit=None
        ),
        "template_rare_all_time": AuditFilter(template=TEMPLATES[39], limit=None),
        "template_version": AuditFilter(template=TEMPLATES[0], template_version=1),
        "template_group": AuditFilter(template=TEMPLATES[1], group=GROUPS[3]),
    }
    results = {name: timed(run(f)) for name, f in cases.items()}
    results["show_request"] = timed(lambda: len(request_story(engine, "req-00077777")[1]))
    plans = {name: plan(engine, f) for name, f in cases.items() if name.startswith("template")}
    return results, plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--out", type=Path, default=Path("bench/results/audit_query.json"))
    args = parser.parse_args()
    base = make_url(os.environ["ZIMAGE_TEST_POSTGRES_URL"])
    name = f"zimage_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(base.set(database=name))
    try:
        migrate.upgrade(engine)
        start = time.perf_counter()
        counts = load(engine, args.events)
        load_s = time.perf_counter() - start
        print(f"loaded {counts} in {load_s:.1f} s")
        timings, plans = queries(engine)
        for case, t in timings.items():
            print(
                f"{case:<24} p50 {t['median_ms']:>8} ms  p95 {t['p95_ms']:>8} ms  "
                f"max {t['max_ms']:>8} ms  rows {t['rows']}"
            )
        start = time.perf_counter()
        report = verify_chain(engine)
        verify_s = time.perf_counter() - start
        print(
            f"verify_chain: ok={report.ok} over {report.events_checked} events in {verify_s:.1f} s"
        )
        with engine.connect() as conn:
            version = conn.scalar(text("SHOW server_version"))
            size = conn.scalar(text("SELECT pg_size_pretty(pg_database_size(current_database()))"))
        result = {
            "benchmark": "audit_query",
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "postgresql": version,
            },
            "data": {**counts, "database_size": size, "load_s": round(load_s, 1)},
            "queries_ms": timings,
            "template_query_plans": plans,
            "verify_chain": {
                "ok": report.ok,
                "events": report.events_checked,
                "seconds": round(verify_s, 1),
            },
            "note": (
                f"{RUNS} runs per query through query_requests/request_story; median (p50) "
                f"and p95 of runs 2-{RUNS}; first_ms is run 1."
            ),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
        if args.keep:
            print(f"kept database {name}")
    finally:
        engine.dispose()
        if not args.keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
