"""SeaweedFS launch flags against the S3 PutObject latency of a 1.5 MB image.

    python bench/s3_tuning.py [--rounds N] [--only NAME,...] [--check] [--out FILE]

For each configuration in CONFIGS this starts a private `weed server` (its own temporary
directory, ports and access keys; never the shared services of scripts/services.sh),
creates the two buckets the product uses (the audit one with Object Lock), and times:

- `object_store`: ObjectStore.put_object as the worker calls it (boto3 with the project's
  client config; SHA-256 checksum header, metadata, tags, If-None-Match: *);
- `boto3_bare`: the same client's put_object with the body only;
- `presigned_http`: a plain HTTP PUT to a presigned URL (no boto3 on the request path);
- `volume_direct` / `filer`: assign + PUT on the volume server, and a filer PUT (the
  layers under the S3 gateway, for reference);
- `audit_put_json`: a small JSON record with retention into the Object Lock bucket.

Also the CPU seconds the weed process spent per object_store PUT. With --check, every
configuration must pass the feature checks the product relies on (conditional put
refused with 412, tagging and metadata round-trips, SHA-256 checksum accepted and a
wrong one refused, a wrong secret refused, Object Lock bucket + put with retention,
DeleteObjects). Each configuration's run holds /tmp/zimage-services.lock (the lock the
project's benchmarks share). Results go to bench/results/s3_tuning.json.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import urllib3
from botocore.exceptions import ClientError
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zimage_pipeline.settings import StorageSettings  # noqa: E402
from zimage_pipeline.storage import ObjectStore, wire  # noqa: E402

LOCK = Path("/tmp/zimage-services.lock")  # noqa: S108 (the project's shared benchmark lock)
PAYLOAD_BYTES = 1_500_000
IMAGES, AUDIT = "zimage-images", "zimage-audit"
# Private ports; gRPC listens on port + 10000. None of these is a port the shared
# services use (their gRPC ports are 29333, 28080, 28888 and 18333).
MASTER_PORT, VOLUME_PORT, FILER_PORT, S3_PORT = 39333, 38080, 38888, 38333


def base_flags(command: str, data: Path, s3_config: Path) -> list[str]:
    """scripts/services.sh seaweed_up's `weed server` line, on the private ports. The
    S3 gateway's Iceberg and Lance listeners are off here only because their default
    ports (8181, 9101) are the shared instance's. `weed mini` takes the same flags,
    less the -filer switch (it always runs a filer)."""
    switches = {"-filer"} if command == "mini" else set()
    flags = [
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={MASTER_PORT}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={VOLUME_PORT}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={FILER_PORT}",
        "-s3",
        f"-s3.port={S3_PORT}",
        f"-s3.config={s3_config}",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    return [command, *(f for f in flags if f not in switches)]


@dataclass(frozen=True)
class Config:
    name: str
    flags: list[str] = field(default_factory=list)  # added to base_flags
    command: str = "server"
    env: dict[str, str] = field(default_factory=dict)
    filer_toml: str | None = None  # written to the weed process's working directory


CONFIGS = [
    Config("current (services.sh)"),
    # Volume files fallocated at creation (64 MB each here) instead of grown by appends.
    Config("master.volumePreallocate", ["-master.volumePreallocate"]),
    # Fewer garbage collections: each PUT allocates a few 1.5 MB buffers.
    Config("GOGC=400", env={"GOGC": "400"}),
    # Filer-side inlining of small files; the S3 gateway writes chunks itself (8 MB
    # chunks, never inline), so this is expected to change the filer PUT only.
    Config("filer.saveToFilerLimit=2MB", ["-filer.saveToFilerLimit=2097152"]),
    # The all-in-one dev layout (admin UI and maintenance workers included).
    Config("weed mini", ["-webdav=false", "-admin.port=36646"], command="mini"),
    Config("current again (run-to-run noise)"),
]


@dataclass
class Weed:
    process: subprocess.Popen[bytes]
    workdir: Path
    key_id: str
    secret: str

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def benchmark_lock() -> Iterator[None]:
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def private_weed(config: Config) -> Iterator[Weed]:
    weed_bin = ROOT / ".venv" / "bin" / "weed"
    busy = [p for p in (MASTER_PORT, VOLUME_PORT, FILER_PORT, S3_PORT) if port_open(p)]
    if busy:
        sys.exit(f"ports {busy} are taken: another s3_tuning run?")
    workdir = Path(tempfile.mkdtemp(prefix="s3-tuning-"))
    key_id, secret = "bench" + secrets.token_hex(6), secrets.token_urlsafe(24)
    s3_config = workdir / "s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "bench",
                        "credentials": [{"accessKey": key_id, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    (workdir / "data").mkdir()
    if config.filer_toml is not None:
        (workdir / "filer.toml").write_text(config.filer_toml.replace("{dir}", str(workdir)))
    log = (workdir / "weed.log").open("wb")
    process = subprocess.Popen(
        [str(weed_bin), *base_flags(config.command, workdir / "data", s3_config), *config.flags],
        cwd=workdir,
        # TMPDIR: weed's own log files (glog writes them to the temporary directory).
        env={**os.environ, "TMPDIR": str(workdir), **config.env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(240):
            if port_open(S3_PORT):
                break
            if process.poll() is not None:
                raise RuntimeError(f"weed exited: {(workdir / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.25)
        else:
            raise RuntimeError("weed did not open its S3 port")
        yield Weed(process, workdir, key_id, secret)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        # weed leaves its unix sockets (named by port, always in /tmp) behind: ours only.
        for port in (MASTER_PORT, VOLUME_PORT, FILER_PORT, S3_PORT):
            for grpc in (port, port + 10000):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{grpc}.sock"):  # noqa: S108
                    sock.unlink(missing_ok=True)


def store_for(weed: Weed, bucket: str = IMAGES) -> ObjectStore:
    settings = StorageSettings(
        endpoint_url=f"http://127.0.0.1:{S3_PORT}",
        bucket=bucket,
        access_key_id=SecretStr(weed.key_id),
        secret_access_key=SecretStr(weed.secret),
    )
    return ObjectStore(settings)


def create_buckets(store: ObjectStore) -> None:
    for bucket, extra in ((IMAGES, {}), (AUDIT, {"ObjectLockEnabledForBucket": True})):
        for _ in range(120):
            try:
                store.client.create_bucket(Bucket=bucket, **extra)  # type: ignore[arg-type]
                break
            except ClientError as exc:
                if wire.error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    break
                time.sleep(0.5)
        else:
            raise RuntimeError(f"bucket {bucket} could not be created")


def timed(rounds: int, run: Callable[[int], None], warmup: int = 5) -> dict[str, float]:
    for i in range(warmup):
        run(-1 - i)
    times = []
    cpu_started = time.process_time()
    for i in range(rounds):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    client_cpu = time.process_time() - cpu_started
    times.sort()
    return {
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
        "mean_ms": round(statistics.fmean(times) * 1000, 2),
        "client_cpu_ms": round(client_cpu / rounds * 1000, 2),  # this Python process
    }


def measure(weed: Weed, rounds: int) -> dict[str, Any]:
    store = store_for(weed)
    create_buckets(store)
    audit = store_for(weed, AUDIT)
    http = urllib3.PoolManager()
    payload = os.urandom(PAYLOAD_BYTES)
    digests = wire.sha256_digests(payload)
    run_id = uuid.uuid4().hex[:8]
    results: dict[str, Any] = {}

    def object_store(i: int) -> None:
        store.put_object(
            f"tuning/{run_id}/img-{i}.png",
            payload,
            digests=digests,
            content_type="image/png",
            metadata={"request-id": f"r-{i}", "user": "alice", "model": "tiny", "seed": "1"},
            tags={"generator": "zimage-pipeline", "ai-generated": "true"},
        )

    def boto3_bare(i: int) -> None:
        store.client.put_object(Bucket=IMAGES, Key=f"tuning/{run_id}/bare-{i}", Body=payload)

    def presigned_http(i: int) -> None:
        url = store.client.generate_presigned_url(
            "put_object", Params={"Bucket": IMAGES, "Key": f"tuning/{run_id}/plain-{i}"}
        )
        response = http.request("PUT", url, body=payload)
        assert response.status == 200, response.data

    def volume_direct(_: int) -> None:
        master = f"http://127.0.0.1:{MASTER_PORT}"
        assigned = json.loads(http.request("GET", f"{master}/dir/assign").data)
        url = f"http://{assigned['url']}/{assigned['fid']}"
        response = http.request("PUT", url, fields={"file": ("blob", payload)})
        assert response.status in (200, 201), response.data

    def filer(i: int) -> None:
        url = f"http://127.0.0.1:{FILER_PORT}/tuning-{run_id}/filer-{i}"
        response = http.request("PUT", url, body=payload)
        assert response.status in (200, 201), response.data

    retain = datetime.now(UTC) + timedelta(days=1)

    def audit_put_json(i: int) -> None:
        audit.put_json(
            f"tuning/{run_id}/anchor-{i}",
            {"kind": "anchor", "seq": i, "event_hash": "0" * 64},
            tags={"kind": "audit-anchor"},
            retain_until=retain,
            lock_mode="GOVERNANCE",
        )

    cpu_before = weed.cpu_s()
    results["object_store"] = timed(rounds, object_store)
    results["weed_cpu_ms_per_object_store_put"] = round(
        (weed.cpu_s() - cpu_before) / (rounds + 5) * 1000, 2
    )
    results["boto3_bare"] = timed(rounds, boto3_bare)
    results["presigned_http"] = timed(rounds, presigned_http)
    results["volume_direct"] = timed(rounds, volume_direct)
    results["filer"] = timed(rounds, filer)
    results["audit_put_json"] = timed(max(10, rounds // 4), audit_put_json)
    head = store.client.put_object(
        Bucket=IMAGES,
        Key=f"tuning/{run_id}/echo",
        Body=payload,
        ChecksumSHA256=digests[1],
    )
    results["put_response_echoes_checksum_sha256"] = head.get("ChecksumSHA256") == digests[1]
    return results


def check_features(weed: Weed) -> dict[str, bool]:
    """One pass over what the product relies on; every value must be True."""
    store = store_for(weed)
    client = store.client
    key = f"features/{uuid.uuid4().hex[:8]}"
    data = os.urandom(4096)
    sha_hex, sha_b64 = wire.sha256_digests(data)
    checks: dict[str, bool] = {}

    store.put_object(
        key + "/a",
        data,
        content_type="image/png",
        metadata={"request-id": "r-1", "user": "alice"},
        tags={"generator": "zimage-pipeline", "ai-generated": "true"},
    )
    try:
        client.put_object(Bucket=IMAGES, Key=key + "/a", Body=b"other", IfNoneMatch="*")
        checks["conditional_put_refused_412"] = False
    except ClientError as exc:
        checks["conditional_put_refused_412"] = wire.http_status(exc) == 412
    head = client.head_object(Bucket=IMAGES, Key=key + "/a", ChecksumMode="ENABLED")
    checks["metadata_round_trip"] = head["Metadata"].get("request-id") == "r-1" and head[
        "Metadata"
    ].get("sha256") == (sha_hex)
    checks["checksum_sha256_kept"] = head.get("ChecksumSHA256") == sha_b64
    tags = client.get_object_tagging(Bucket=IMAGES, Key=key + "/a")["TagSet"]
    checks["tagging_round_trip"] = {t["Key"]: t["Value"] for t in tags} == {
        "generator": "zimage-pipeline",
        "ai-generated": "true",
    }
    checks["body_round_trip"] = store.get_object(key + "/a") == data
    wrong = base64.b64encode(hashlib.sha256(b"not the body").digest()).decode()
    try:
        client.put_object(Bucket=IMAGES, Key=key + "/bad", Body=data, ChecksumSHA256=wrong)
        checks["wrong_checksum_refused"] = False
    except ClientError as exc:
        checks["wrong_checksum_refused"] = 400 <= wire.http_status(exc) < 500
    intruder = store_for(Weed(weed.process, weed.workdir, weed.key_id, "wrong-" + weed.secret))
    try:
        intruder.client.put_object(Bucket=IMAGES, Key=key + "/intruder", Body=b"x")
        checks["wrong_secret_refused_403"] = False
    except ClientError as exc:
        checks["wrong_secret_refused_403"] = wire.http_status(exc) == 403

    audit = store_for(weed, AUDIT)
    checks["object_lock_enabled_on_audit_bucket"] = audit.object_lock_enabled(AUDIT)
    retain = datetime.now(UTC) + timedelta(days=1)
    stored = audit.put_json(
        key + "/anchor",
        {"seq": 1},
        bucket=AUDIT,
        tags={"kind": "audit-anchor"},
        retain_until=retain,
        lock_mode="COMPLIANCE",
    )
    retention = audit.client.get_object_retention(Bucket=AUDIT, Key=stored.key)["Retention"]
    checks["put_with_retention"] = retention.get("Mode") == "COMPLIANCE"
    checks["retained_version_not_deletable"] = False
    if stored.version_id is not None:
        try:
            audit.client.delete_object(Bucket=AUDIT, Key=stored.key, VersionId=stored.version_id)
        except ClientError as exc:
            checks["retained_version_not_deletable"] = wire.http_status(exc) == 403

    for i in range(3):
        store.put_object(key + f"/d{i}", data, content_type="image/png", metadata={}, tags={})
    deleted = client.delete_objects(
        Bucket=IMAGES, Delete={"Objects": [{"Key": key + f"/d{i}"} for i in range(3)]}
    )
    left = list(store.list_keys(key + "/d"))
    checks["delete_objects"] = len(deleted.get("Deleted", [])) == 3 and not left
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--only", help="comma-separated configuration names (prefixes)")
    parser.add_argument("--check", action="store_true", help="run the feature checks too")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "s3_tuning.json")
    args = parser.parse_args()
    chosen = CONFIGS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        chosen = [c for c in CONFIGS if any(c.name.startswith(w) for w in wanted)]
    weed_version = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "weed"), "version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    report: dict[str, Any] = {
        "benchmark": "s3_tuning",
        "weed_version": weed_version,
        "cpus": os.cpu_count(),
        "payload_bytes": PAYLOAD_BYTES,
        "rounds": args.rounds,
        "configs": [],
    }
    for config in chosen:
        with benchmark_lock(), private_weed(config) as weed:
            print(f"== {config.name}", flush=True)
            entry: dict[str, Any] = {
                "name": config.name,
                "flags": config.flags,
                "env": config.env,
                "filer_toml": config.filer_toml,
            }
            entry.update(measure(weed, args.rounds))
            if args.check:
                entry["features"] = check_features(weed)
            print(json.dumps(entry, indent=2), flush=True)
            report["configs"].append(entry)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
