"""Anchors in the real SeaweedFS catch a rewritten database; the audit CLI end to end."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Engine, select, text, update
from typer.testing import CliRunner

from tests.conftest import require_env
from tests.integration.test_audit_chain import story
from zimage_pipeline.audit import AuditLog, ChainAnchorer, event_hash, verify_bundle, verify_chain
from zimage_pipeline.cli import app
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.models import AuditChainHead, AuditEventRow
from zimage_pipeline.settings import LockMode, Settings, load_settings
from zimage_pipeline.storage import ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(ledger_url: str) -> Iterator[Settings]:
    """The local stack with this test's own ledger and its own key prefix in S3."""
    require_env("ZIMAGE_STORAGE__ACCESS_KEY_ID_FILE")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    value = load_settings(database={"url": ledger_url}, storage={"prefix": prefix})
    yield value
    store = ObjectStore(value.storage)
    for bucket in (value.storage.bucket, value.storage.audit_bucket):
        for key in list(store.list_keys(prefix + "/", bucket=bucket)):
            store.client.delete_object(Bucket=bucket, Key=key)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = create_ledger_engine(settings.database)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def anchorer(settings: Settings, engine: Engine) -> ChainAnchorer:
    store = ObjectStore(settings.storage)
    return ChainAnchorer(engine, store, storage=settings.storage, audit=settings.audit)


def rewrite_consistently(engine: Engine, seq: int, actor: str) -> None:
    """What an attacker with database access does: edit a row and recompute every hash
    after it, and the head, so that the chain alone verifies again."""
    with engine.begin() as conn:
        conn.execute(update(AuditEventRow).where(AuditEventRow.seq == seq).values(actor=actor))
        prev = conn.scalar(select(AuditEventRow.prev_hash).where(AuditEventRow.seq == seq))
        rows = conn.execute(
            select(AuditEventRow).where(AuditEventRow.seq >= seq).order_by(AuditEventRow.seq)
        ).all()
        for row in rows:
            digest = event_hash(
                seq=row.seq,
                at=row.at.replace(tzinfo=UTC) if row.at.tzinfo is None else row.at,
                request_id=row.request_id,
                event_type=row.event_type,
                actor=row.actor,
                payload_text=row.payload,
                prev_hash=prev,
            )
            conn.execute(
                update(AuditEventRow)
                .where(AuditEventRow.seq == row.seq)
                .values(prev_hash=prev, event_hash=digest)
            )
            prev = digest
        conn.execute(update(AuditChainHead).values(event_hash=prev))


def test_consistent_rewrite_is_caught_by_the_anchor(settings: Settings, engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    anchor = anchorer(settings, engine).anchor()
    assert anchor is not None and anchor.seq == 7

    rewrite_consistently(engine, 2, "someone-else")

    assert verify_chain(engine).ok  # the chain alone is fooled...
    report = verify_chain(engine, anchors=anchorer(settings, engine).anchors())
    first = report.first_broken
    assert first is not None  # ...the anchor is not
    assert (first.seq, first.problem) == (7, "anchor_mismatch")


def test_truncation_is_caught_by_the_anchor(settings: Settings, engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    anchorer(settings, engine).anchor()
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq > 4"))
        h4 = conn.scalar(select(AuditEventRow.event_hash).where(AuditEventRow.seq == 4))
        conn.execute(update(AuditChainHead).values(seq=4, event_hash=h4))

    assert verify_chain(engine).ok
    first = verify_chain(engine, anchors=anchorer(settings, engine).anchors()).first_broken
    assert first is not None and (first.seq, first.problem) == (7, "truncated")


def test_anchoring_is_idempotent_across_workers(settings: Settings, engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    first = anchorer(settings, engine).anchor()
    second = anchorer(settings, engine).anchor()  # another worker, same head
    assert first is not None and second is not None and first.key == second.key
    assert anchorer(settings, engine).anchor() is not None
    assert [a.seq for a in anchorer(settings, engine).anchors()] == [7]


def test_anchors_get_object_lock_retention(settings: Settings, engine: Engine) -> None:
    """In a bucket created with Object Lock (SeaweedFS supports it), anchors are retained."""
    store = ObjectStore(settings.storage)
    bucket = f"zimage-test-lock-{uuid.uuid4().hex[:10]}"
    store.client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    storage = settings.storage.model_copy(update={"audit_bucket": bucket})
    audit = settings.audit.model_copy(
        update={"anchor_lock_mode": LockMode.GOVERNANCE, "anchor_retention_days": 1}
    )
    try:
        story(AuditLog(engine), "req-1")
        anchor = ChainAnchorer(engine, store, storage=storage, audit=audit).anchor()
        assert anchor is not None
        retention = store.client.get_object_retention(Bucket=bucket, Key=anchor.key)
        assert retention["Retention"]["Mode"] == "GOVERNANCE"
        assert retention["Retention"]["RetainUntilDate"] > datetime.now(UTC) + timedelta(hours=23)
        with pytest.raises(Exception, match="AccessDenied"):
            store.client.delete_object(Bucket=bucket, Key=anchor.key, VersionId=anchor.version_id)
    finally:
        versions = store.client.list_object_versions(Bucket=bucket)
        for v in versions.get("Versions", []) + versions.get("DeleteMarkers", []):
            store.client.delete_object(
                Bucket=bucket,
                Key=v["Key"],
                VersionId=v["VersionId"],
                BypassGovernanceRetention=True,
            )
        store.client.delete_bucket(Bucket=bucket)


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "ZIMAGE_DATABASE__URL": settings.database.url,
        "ZIMAGE_STORAGE__PREFIX": settings.storage.prefix,
    }


def test_cli_verify_names_the_edited_row(settings: Settings, engine: Engine) -> None:
    story(AuditLog(engine), "req-1")
    runner = CliRunner()
    assert runner.invoke(app, ["audit", "anchor"], env=cli_env(settings)).exit_code == 0
    ok = runner.invoke(app, ["audit", "verify"], env=cli_env(settings))
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "1 anchors" in ok.output

    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET event_type = 'failed' WHERE seq = 5"))
    broken = runner.invoke(app, ["audit", "verify"], env=cli_env(settings))

    assert broken.exit_code == 1
    assert "first broken event: event 5 (req-1 failed): edited" in broken.output


def test_cli_query_show_and_export(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    log = AuditLog(engine)
    story(log, "req-1", user="alice")
    story(log, "req-2", user="bob")
    runner, env = CliRunner(), cli_env(settings)

    table = runner.invoke(app, ["audit", "query", "--group", "editors"], env=env)
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split()[:4] == ["first_at", "request_id", "user", "status"]
    assert "(2 requests)" in table.output

    jsonl = runner.invoke(app, ["audit", "query", "--user", "bob", "--format", "jsonl"], env=env)
    rows = [json.loads(line) for line in jsonl.output.splitlines()]
    assert [(r["request_id"], r["status"], r["model"]) for r in rows] == [
        ("req-2", "published", "Z-Image-Turbo@abc")
    ]

    as_csv = runner.invoke(
        app, ["audit", "query", "--label", "sku=SKU-1", "--format", "csv"], env=env
    )
    records = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert sorted(r["request_id"] for r in records) == ["req-1", "req-2"]

    shown = runner.invoke(app, ["audit", "show", "req-1", "--format", "json"], env=env)
    document = json.loads(shown.output)
    assert document["request"]["user"] == "alice"
    assert len(document["events"]) == 7
    missing = runner.invoke(app, ["audit", "show", "nope"], env=env)
    assert missing.exit_code == 4

    key = ed25519.Ed25519PrivateKey.generate()
    key_file = tmp_path / "export.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bundle = tmp_path / "bundle"
    exported = runner.invoke(
        app,
        [
            "audit",
            "export",
            str(bundle),
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-02",
            "--signed-off-by",
            "Compliance Officer",
        ],
        env={**env, "ZIMAGE_AUDIT__EXPORT_SIGNING_KEY_FILE": str(key_file)},
    )
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["events"]["count"] == 14
    assert manifest["chain_verified"] is True
    assert manifest["signed_off_by"] == "Compliance Officer"
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert verify_bundle(bundle, public_key_pem=public) == []

    events = bundle / "events.jsonl"
    events.write_text(events.read_text().replace("alice", "mallory"))
    assert any("events.jsonl" in p for p in verify_bundle(bundle, public_key_pem=public))
