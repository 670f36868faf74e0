"""Anchor keys per chain, and which legacy (position-only) anchors a chain claims."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from sqlalchemy import create_engine

from zimage_pipeline.audit.anchoring import Anchor, ChainAnchorer, Genesis, _split_legacy
from zimage_pipeline.settings import AuditSettings, StorageSettings
from zimage_pipeline.storage import ObjectStore

CHAIN = "ab" * 32
FIRST = Genesis(CHAIN, datetime(2026, 11, 1, 9, 0, tzinfo=UTC))


def legacy(seq: int, event_at: str) -> Anchor:
    return Anchor(seq, "00" * 32, event_at, f"zimage/audit-anchors/{seq:016d}.json")


def test_keys_carry_the_chain_identity() -> None:
    anchorer = ChainAnchorer(
        create_engine("sqlite://"),
        cast(ObjectStore, None),  # building keys touches no store
        storage=StorageSettings(prefix="zimage"),
        audit=AuditSettings(),
    )
    assert anchorer.prefix == "zimage/audit-anchors/"
    assert anchorer.key(CHAIN, 7) == f"zimage/audit-anchors/{CHAIN}/0000000000000007.json"


def test_legacy_anchors_older_than_the_first_event_are_another_ledgers() -> None:
    before = legacy(7, "2026-10-31T23:59:59+00:00")
    same_time = legacy(1, "2026-11-01T09:00:00+00:00")
    after = legacy(9, "2026-11-02T00:00:00+00:00")

    mine, skipped = _split_legacy([before, same_time, after], FIRST)

    assert (mine, skipped) == ([same_time, after], 1)


def test_a_legacy_anchor_whose_time_cannot_be_read_is_checked() -> None:
    unreadable = legacy(3, "None")
    assert _split_legacy([unreadable], FIRST) == ([unreadable], 0)


def test_a_ledger_without_a_first_event_claims_no_legacy_anchor() -> None:
    assert _split_legacy([legacy(3, "2026-11-02T00:00:00+00:00")], None) == ([], 1)
