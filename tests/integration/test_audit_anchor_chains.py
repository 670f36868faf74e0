"""Two ledgers anchoring into one audit bucket under one prefix (issue 14, section 7).

A second ledger (a new PostgreSQL database, staging beside production, a rebuilt or
copied ledger) shares the audit bucket and `storage.prefix` with the first. Anchors are
kept per chain, so neither chain's `audit verify` reads the other's anchors, and a
ledger is refused (with a message naming the problem) where another chain's anchor
already stands: the bucket locks anchors, nothing written there can be taken back.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from tests.integration.test_audit_anchors_cli import rewrite_consistently
from tests.integration.test_audit_chain import T0, story
from zimage_pipeline.audit import AuditLog
from zimage_pipeline.cli import app
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.settings import DatabaseSettings, load_settings
from zimage_pipeline.storage import ObjectStore, anchor_key

pytestmark = pytest.mark.integration


@dataclass
class Ledger:
    url: str
    prefix: str
    engine: Engine

    def env(self, **extra: str) -> dict[str, str]:
        return {"ZIMAGE_DATABASE__URL": self.url, "ZIMAGE_STORAGE__PREFIX": self.prefix, **extra}

    def cli(self, *args: str, **env: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["audit", *args], env=self.env(**env))
        return result.exit_code, result.output


def open_ledger(url: str, prefix: str) -> Ledger:
    engine = create_ledger_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)
    return Ledger(url, prefix, engine)


@pytest.fixture
def production(postgres_url: str, prefix: str) -> Iterator[Ledger]:
    ledger = open_ledger(postgres_url, prefix)
    yield ledger
    ledger.engine.dispose()


@pytest.fixture
def staging(tmp_path: Path, prefix: str) -> Iterator[Ledger]:
    """Another ledger (SQLite) beside production: same audit bucket, same prefix."""
    ledger = open_ledger(f"sqlite:///{tmp_path / 'staging.db'}", prefix)
    yield ledger
    ledger.engine.dispose()


def anchored(ledger: Ledger) -> str:
    code, output = ledger.cli("anchor")
    assert code == 0, output
    return output


def verified(ledger: Ledger) -> str:
    code, output = ledger.cli("verify")
    assert "anchor_mismatch" not in output and "truncated" not in output, output
    assert code == 0, output
    return output


def test_two_ledgers_sharing_a_bucket_and_prefix_both_verify(
    production: Ledger, staging: Ledger
) -> None:
    # Interleaved so that each ledger anchors at positions the other holds events at.
    story(AuditLog(production.engine), "prod-1")
    anchored(production)  # seq 7
    story(AuditLog(staging.engine), "staging-1")
    story(AuditLog(staging.engine), "staging-2")
    anchored(staging)  # seq 14
    story(AuditLog(production.engine), "prod-2")
    story(AuditLog(production.engine), "prod-3")
    anchored(production)  # seq 21

    assert "2 anchors" in verified(production)
    assert "1 anchors" in verified(staging)


def test_anchoring_where_another_chain_stands_is_refused(tmp_path: Path, prefix: str) -> None:
    """A copy of a ledger shares its first event, and so its chain identity; once the two
    diverge, the copy may not anchor over the original's positions."""
    original = open_ledger(f"sqlite:///{tmp_path / 'original.db'}", prefix)
    story(AuditLog(original.engine), "req-1")
    original.engine.dispose()
    shutil.copy(tmp_path / "original.db", tmp_path / "copy.db")
    original = open_ledger(original.url, prefix)
    copy = open_ledger(f"sqlite:///{tmp_path / 'copy.db'}", prefix)
    try:
        story(AuditLog(original.engine), "req-2")
        story(AuditLog(copy.engine), "other-2")
        anchored(original)  # seq 14

        code, output = copy.cli("anchor")

        assert code == 1
        assert "refusing" in output and "another ledger" in output, output
        assert "seq 14" in output, output
        assert "1 anchors" in verified(original)
    finally:
        original.engine.dispose()
        copy.engine.dispose()


def chain_of(ledger: Ledger) -> str:
    for line in verified(ledger).splitlines():
        if line.startswith("chain "):
            return line.split()[1]
    raise AssertionError("audit verify did not name the chain")


def test_a_pinned_chain_refuses_another_ledger(production: Ledger, staging: Ledger) -> None:
    story(AuditLog(production.engine), "prod-1")
    story(AuditLog(staging.engine), "staging-1")
    pin = {"ZIMAGE_AUDIT__CHAIN_ID": chain_of(production)}

    assert production.cli("anchor", **pin)[0] == 0
    code, output = staging.cli("anchor", **pin)
    assert code == 1 and "audit.chain_id" in output, output
    code, output = staging.cli("verify", **pin)
    assert code == 1 and "foreign_chain" in output, output


def write_legacy_anchor(ledger: Ledger, seq: int, event_hash: str, event_at: str) -> None:
    """What the code before chain-keyed anchors wrote: `{prefix}/audit-anchors/{seq}.json`."""
    settings = load_settings(storage={"prefix": ledger.prefix})
    body = {
        "kind": "zimage.audit-anchor/v1",
        "seq": seq,
        "event_hash": event_hash,
        "event_at": event_at,
    }
    key = anchor_key(ledger.prefix, settings.audit.anchor_prefix, seq)
    ObjectStore(settings.storage).put_json(key, body, bucket=settings.storage.audit_bucket)


def test_legacy_anchors_stay_checked_for_the_ledger_that_wrote_them(
    production: Ledger, staging: Ledger
) -> None:
    story(AuditLog(production.engine), "prod-1")
    with production.engine.connect() as conn:
        head = conn.exec_driver_sql("SELECT event_hash FROM audit_chain_head").scalar_one()
    write_legacy_anchor(production, 7, head, (T0 + timedelta(seconds=6)).isoformat())
    # Staging was created after production's legacy anchor: it cannot be staging's.
    story(AuditLog(staging.engine), "staging-1", at=T0 + timedelta(days=1))

    assert "1 anchors" in verified(production)
    assert "1 legacy anchors of other ledgers skipped" in verified(staging)

    rewrite_consistently(production.engine, 2, "someone-else")
    code, output = production.cli("verify")
    assert code == 1
    assert "event 7" in output and "anchor_mismatch" in output and "legacy" in output, output
