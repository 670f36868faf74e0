"""Anchors: the chain head written to the audit bucket, so a rewritten database shows.

A consistent rewrite of the whole chain (every hash recomputed) passes the chain check;
it cannot also rewrite the anchors, which live in another system, never overwrite
(`If-None-Match`) and, where the bucket has Object Lock, are retained immutably
(`audit.anchor_lock_mode` for `audit.anchor_retention_days`). SeaweedFS and AWS S3 both
support Object Lock on buckets created with it.

An anchor's content depends only on the head it records, so workers anchoring the same
head at once write identical bytes and all succeed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select

from zimage_pipeline.ledger.models import AuditChainHead, AuditEventRow
from zimage_pipeline.settings import AuditSettings, StorageSettings
from zimage_pipeline.storage import ObjectStore, StorageFailedError, anchor_key, safe_prefix

ANCHOR_KIND = "zimage.audit-anchor/v1"


@dataclass(frozen=True, slots=True)
class Anchor:
    seq: int
    event_hash: str
    event_at: str
    key: str
    version_id: str | None = None


class ChainAnchorer:
    def __init__(
        self,
        engine: Engine,
        store: ObjectStore,
        *,
        storage: StorageSettings,
        audit: AuditSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.store = store
        self.storage = storage
        self.audit = audit
        self._clock = clock
        self._last_anchor_at: float | None = None
        self._last_seq = -1
        self._lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self.storage.audit_bucket

    @property
    def prefix(self) -> str:
        parts = [safe_prefix(self.storage.prefix), safe_prefix(self.audit.anchor_prefix)]
        return "/".join(p for p in parts if p) + "/"

    def anchor(self) -> Anchor | None:
        """Write the current head (None when the chain is empty or already anchored here)."""
        with self.engine.connect() as conn:
            head = conn.execute(
                select(AuditChainHead.seq, AuditChainHead.event_hash).where(AuditChainHead.id == 1)
            ).one()
            if head.seq == 0 or head.seq == self._last_seq:
                return None
            at = conn.scalar(select(AuditEventRow.at).where(AuditEventRow.seq == head.seq))
        event_at = at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at
        body = {
            "kind": ANCHOR_KIND,
            "seq": head.seq,
            "event_hash": head.event_hash,
            "event_at": event_at.isoformat() if event_at else None,
        }
        key = anchor_key(self.storage.prefix, self.audit.anchor_prefix, head.seq)
        retain_until = None
        if self.store.object_lock_enabled(self.bucket):
            retain_until = datetime.now(UTC) + timedelta(days=self.audit.anchor_retention_days)
        stored = self.store.put_json(
            key,
            body,
            bucket=self.bucket,
            tags={"kind": "audit-anchor"},
            retain_until=retain_until,
            lock_mode=self.audit.anchor_lock_mode.value,
        )
        self._last_seq = head.seq
        return Anchor(head.seq, head.event_hash, str(body["event_at"]), key, stored.version_id)

    def maybe_anchor(self) -> Anchor | None:
        """Anchor if `audit.anchor_interval_s` has passed since this process last did;
        the worker calls this after each request (cheap when not due)."""
        now = self._clock()
        with self._lock:
            due = (
                self._last_anchor_at is None
                or now - self._last_anchor_at >= self.audit.anchor_interval_s
            )
            if not due:
                return None
            self._last_anchor_at = now
        return self.anchor()

    def anchors(self) -> list[Anchor]:
        """Every anchor in the audit bucket, in seq order."""
        found = []
        for key in self.store.list_keys(self.prefix, bucket=self.bucket):
            if not key.endswith(".json"):
                continue
            raw = self.store.get_object(key, bucket=self.bucket)
            try:
                body = json.loads(raw)
                if body.get("kind") != ANCHOR_KIND:
                    continue
                found.append(
                    Anchor(int(body["seq"]), str(body["event_hash"]), str(body["event_at"]), key)
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise StorageFailedError(f"unreadable anchor s3://{self.bucket}/{key}") from exc
        return sorted(found, key=lambda a: a.seq)
