"""`audit export`: a self-verifying bundle of the events in a time range.

The directory gets `events.jsonl` (every event with the exact payload text its hash
covers), `requests.jsonl` (the index rows of those requests), `anchors.json` (the
anchors inside the exported seq range), `manifest.json` (range, counts, the chain's
first `prev_hash` and last hash, whether the range verified, who signed it off, and the
SHA-256 of every file) and, with `audit.export_signing_key_file`, `manifest.sig` (a
detached signature over manifest.json). `verify_bundle` re-checks all of it offline.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from zimage_pipeline.audit.anchoring import Anchor
from zimage_pipeline.audit.chain import as_utc, event_hash, format_time
from zimage_pipeline.audit.errors import ExportError
from zimage_pipeline.audit.queries import AuditFilter, query_requests
from zimage_pipeline.audit.verify import VerifyReport, verify_chain
from zimage_pipeline.ledger.models import AuditEventRow

EXPORT_KIND = "zimage.audit-export/v1"


def export_bundle(
    engine: Any,
    directory: Path,
    *,
    since: datetime,
    until: datetime,
    anchors: Sequence[Anchor] = (),
    signed_off_by: str | None = None,
    signing_key_file: Path | None = None,
    chain_id: str | None = None,
) -> dict[str, Any]:
    """`chain_verified` is the whole ledger's verdict (`verify_chain`: every event,
    retained prompts, the head, the anchors, the pinned chain) and the range's own links:
    a bundle cut from a broken ledger never says verified."""
    # In UTC: the ledger stores UTC (naive on SQLite, where an offset would otherwise be
    # compared as wall time and silently shift the range).
    since, until = as_utc(since), as_utc(until)
    if since >= until:
        raise ExportError(f"--from {format_time(since)} is not before --to {format_time(until)}")
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} is not a directory")
    if directory.exists() and any(directory.iterdir()):
        raise ExportError(f"{directory} is not empty; an export never overwrites")
    # Written beside it and moved into place when complete: a failed export (a bad
    # signing key, the ledger gone mid-way) leaves no partial bundle that looks whole.
    partial = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise ExportError(f"{directory}: cannot be created: {exc.strerror or exc}") from None
    try:
        manifest = _write_bundle(
            engine,
            partial,
            since=since,
            until=until,
            anchors=anchors,
            signed_off_by=signed_off_by,
            signing_key_file=signing_key_file,
            chain_id=chain_id,
        )
        if directory.exists():
            directory.rmdir()  # empty, checked above
        partial.rename(directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _write_bundle(
    engine: Any,
    directory: Path,
    *,
    since: datetime,
    until: datetime,
    anchors: Sequence[Anchor],
    signed_off_by: str | None,
    signing_key_file: Path | None,
    chain_id: str | None,
) -> dict[str, Any]:
    from sqlalchemy import func, select

    ledger = verify_chain(engine, anchors=anchors, chain_id=chain_id)
    with engine.connect() as conn:
        # The range by time, then every event between its first and last seq: events
        # appended concurrently can be a few ms out of time order, and a bundle with a
        # hole in its seq range would not verify although the chain is intact.
        low, high = conn.execute(
            select(func.min(AuditEventRow.seq), func.max(AuditEventRow.seq)).where(
                AuditEventRow.at >= since, AuditEventRow.at < until
            )
        ).one()
    first_prev = last_hash = None
    count, first_seq, last_seq, linked, prev = 0, None, None, True, None
    request_ids: set[str] = set()
    with (directory / "events.jsonl").open("w", encoding="utf-8") as out, engine.connect() as conn:
        query = (
            select(AuditEventRow)
            .where(AuditEventRow.seq >= (low or 0), AuditEventRow.seq <= (high or -1))
            .order_by(AuditEventRow.seq)
        )
        for row in conn.execution_options(stream_results=True, yield_per=5000).execute(query):
            line = {
                "seq": row.seq,
                "at": format_time(row.at),
                "request_id": row.request_id,
                "event_type": row.event_type,
                "actor": row.actor,
                "payload_json": row.payload,
                "prompts": json.loads(row.prompt_text) if row.prompt_text else None,
                "prev_hash": row.prev_hash,
                "event_hash": row.event_hash,
            }
            linked = linked and _line_ok(line, prev)
            out.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
            first_prev = first_prev or row.prev_hash
            first_seq = first_seq or row.seq
            last_seq, last_hash, prev = row.seq, row.event_hash, line
            request_ids.add(row.request_id)
            count += 1
    with (directory / "requests.jsonl").open("w", encoding="utf-8") as out:
        window = AuditFilter(since=since, until=until, limit=None)
        for summary in query_requests(engine, window):
            if summary.request_id in request_ids:
                out.write(json.dumps(summary.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
    in_range = [
        asdict(a) for a in anchors if first_seq and last_seq and first_seq <= a.seq <= last_seq
    ]
    (directory / "anchors.json").write_text(json.dumps(in_range, indent=2), encoding="utf-8")
    manifest = {
        "kind": EXPORT_KIND,
        "from": format_time(since),
        "to": format_time(until),
        "created_at": format_time(datetime.now(UTC)),
        "signed_off_by": signed_off_by or getpass.getuser(),
        "events": {
            "count": count,
            "first_seq": first_seq,
            "last_seq": last_seq,
            "first_prev_hash": first_prev,
            "last_hash": last_hash,
        },
        "chain_verified": linked and ledger.ok,
        "ledger_problem": None if ledger.ok else _first_problem(ledger),
        "anchors_in_range": len(in_range),
        "files": {
            name: _file_digest(directory / name)
            for name in ("events.jsonl", "requests.jsonl", "anchors.json")
        },
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    (directory / "manifest.json").write_bytes(manifest_bytes)
    if signing_key_file is not None:
        (directory / "manifest.sig").write_text(
            json.dumps(_sign(manifest_bytes, signing_key_file), indent=2), encoding="utf-8"
        )
    return manifest


def _first_problem(report: VerifyReport) -> str:
    first = report.first_broken
    return first.describe() if first is not None else "the ledger does not verify"


def _line_ok(line: dict[str, Any], prev: dict[str, Any] | None) -> bool:
    recomputed = event_hash(
        seq=line["seq"],
        at=datetime.strptime(line["at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC),
        request_id=line["request_id"],
        event_type=line["event_type"],
        actor=line["actor"],
        payload_text=line["payload_json"],
        prev_hash=line["prev_hash"],
    )
    if recomputed != line["event_hash"]:
        return False
    return prev is None or (
        line["seq"] == prev["seq"] + 1 and line["prev_hash"] == prev["event_hash"]
    )


def _file_digest(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _sign(data: bytes, key_file: Path) -> dict[str, str]:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ExportError(f"export signing key {key_file}: not a usable PEM key") from exc
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature, algorithm = key.sign(data), "ed25519"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature, algorithm = key.sign(data, ec.ECDSA(hashes.SHA256())), "ecdsa-sha256"
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        algorithm = "rsa-pss-sha256"
    else:
        raise ExportError("export signing key: use an Ed25519, EC or RSA key")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "algorithm": algorithm,
        "public_key_pem": public.decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def verify_bundle(directory: Path, *, public_key_pem: str | None = None) -> list[str]:
    """Problems found in an exported bundle; empty means intact (and signed, if asked)."""
    problems: list[str] = []
    manifest_bytes = (directory / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    for name, expected in manifest["files"].items():
        if _file_digest(directory / name) != expected:
            problems.append(f"{name}: SHA-256 differs from the manifest")
    prev = None
    with (directory / "events.jsonl").open(encoding="utf-8") as lines:
        for raw in lines:
            line = json.loads(raw)
            if not _line_ok(line, prev):
                problems.append(f"event {line['seq']}: chain broken inside the bundle")
                break
            prev = line
    signature_file = directory / "manifest.sig"
    if public_key_pem is not None:
        if not signature_file.exists():
            problems.append("manifest.sig missing")
        elif not _signature_ok(
            manifest_bytes, json.loads(signature_file.read_text()), public_key_pem
        ):
            problems.append("manifest.sig does not verify with the given key")
    return problems


def _signature_ok(data: bytes, sig: dict[str, str], public_key_pem: str) -> bool:
    key = serialization.load_pem_public_key(public_key_pem.encode("ascii"))
    signature = base64.b64decode(sig["signature"])
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True
