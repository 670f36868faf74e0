"""Anchors: the chain head written to the audit bucket, so a rewritten database shows.

A consistent rewrite of the whole chain (every hash recomputed) passes the chain check;
it cannot also rewrite the anchors, which live in another system, never overwrite
(`If-None-Match`) and, where the bucket has Object Lock, are retained immutably
(`audit.anchor_lock_mode` for `audit.anchor_retention_days`). SeaweedFS and AWS S3 both
support Object Lock on buckets created with it.

Keys are `{storage.prefix}/{audit.anchor_prefix}/{chain}/{seq:016d}.json`, where `chain`
is the chain's identity: the hash of its first event. Ledgers that share the audit
bucket and prefix (a new database, staging beside production, a rebuilt ledger) anchor
into folders of their own, and each is verified against its own anchors only. The
identity is bound into the chain: a rewrite can only leave its anchors behind by
starting at the first event, which gives it another identity; `audit.chain_id` pins the
identity against that, and `audit verify` names the other chains under the prefix.

Only a ledger with the same first event (a copy of this database) or this chain after a
rewrite can reach a key this chain has anchored. A different anchor there is refused
with AnchorConflictError naming the problem: locked objects cannot be taken back.

An anchor's content depends only on the chain and the head it records, so workers
anchoring the same head at once write identical bytes and all succeed.

Legacy anchors, written before anchors had a chain identity, sit at
`{prefix}/{anchor_prefix}/{seq:016d}.json` and are still read. One that anchors an event
older than this chain's first event cannot be this chain's (an earlier ledger wrote it)
and is skipped; the others are checked like this chain's own.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, select

from zimage_pipeline.audit.chain import as_utc
from zimage_pipeline.audit.errors import AnchorConflictError, AuditError
from zimage_pipeline.ledger.models import AuditChainHead, AuditEventRow
from zimage_pipeline.ports import Objects
from zimage_pipeline.settings import AuditSettings, StorageSettings
from zimage_pipeline.storage import (
    ObjectConflictError,
    StorageError,
    StorageFailedError,
    anchor_key,
    safe_prefix,
)

ANCHOR_KIND = "zimage.audit-anchor/v2"  # keyed by chain and position
LEGACY_ANCHOR_KIND = "zimage.audit-anchor/v1"  # keyed by position only
_LEGACY_NAME = re.compile(r"[0-9]{16}\.json")
_CHAIN_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Anchor:
    seq: int
    event_hash: str
    event_at: str
    key: str
    version_id: str | None = None
    chain: str | None = None  # None: a legacy anchor, keyed by position only

    @property
    def legacy(self) -> bool:
        return self.chain is None


@dataclass(frozen=True, slots=True)
class Genesis:
    """A chain's first event; its hash is the chain's identity."""

    event_hash: str
    at: datetime


@dataclass(frozen=True, slots=True)
class AnchorSurvey:
    """The anchors under the prefix, as one ledger sees them."""

    chain: str | None  # whose anchors were read (None: the ledger has no first event)
    anchors: list[Anchor]  # that chain's, and the legacy ones that can be its; seq order
    legacy_skipped: int  # legacy anchors of events older than the chain's first event
    other_chains: list[str]  # other chains anchored under the same prefix


def read_genesis(conn: Connection) -> Genesis | None:
    row = conn.execute(
        select(AuditEventRow.event_hash, AuditEventRow.at).where(AuditEventRow.seq == 1)
    ).one_or_none()
    return None if row is None else Genesis(row.event_hash, as_utc(row.at))


class ChainAnchorer:
    def __init__(
        self,
        engine: Engine,
        store: Objects,
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
        # When this process last saw the chain head anchored (written now, or already
        # anchored, or nothing to anchor): the worker's anchor-age gauge reads it. Counted
        # from the start, so anchoring that never works shows as an ever older age.
        self._anchored_at = clock()

    @property
    def bucket(self) -> str:
        return self.storage.audit_bucket

    @property
    def prefix(self) -> str:
        """Where every chain's anchors (and the legacy ones) live; ends with '/'."""
        parts = [safe_prefix(self.storage.prefix), safe_prefix(self.audit.anchor_prefix)]
        joined = "/".join(p for p in parts if p)
        return f"{joined}/" if joined else ""

    def key(self, chain: str, seq: int) -> str:
        """`{prefix}/{anchor_prefix}/{chain}/{seq:016d}.json`."""
        return anchor_key(self.storage.prefix, f"{self.audit.anchor_prefix}/{chain}", seq)

    # -- writing ---------------------------------------------------------------------

    def seconds_since_anchored(self) -> float:
        """Seconds since the chain head was last known anchored by this process (the
        `zimage_audit_anchor_age_seconds` gauge); no I/O, safe to call per scrape."""
        return max(0.0, self._clock() - self._anchored_at)

    def anchor(self) -> Anchor | None:
        """Write the current head (None when the chain is empty or already anchored here)."""
        written = self._anchor()
        self._anchored_at = self._clock()  # only reached when nothing raised
        return written

    def _anchor(self) -> Anchor | None:
        with self.engine.connect() as conn:
            head = conn.execute(
                select(AuditChainHead.seq, AuditChainHead.event_hash).where(AuditChainHead.id == 1)
            ).one()
            if head.seq == 0 or head.seq == self._last_seq:
                return None
            genesis = read_genesis(conn)
            at = conn.scalar(select(AuditEventRow.at).where(AuditEventRow.seq == head.seq))
        chain = self._chain_to_anchor(genesis)
        body = {
            "kind": ANCHOR_KIND,
            "chain": chain,
            "seq": head.seq,
            "event_hash": head.event_hash,
            "event_at": as_utc(at).isoformat() if at is not None else None,
        }
        key = self.key(chain, head.seq)
        version_id = self._put_once(key, body)
        self._last_seq = head.seq
        return Anchor(
            head.seq, head.event_hash, str(body["event_at"]), key, version_id, chain=chain
        )

    def _chain_to_anchor(self, genesis: Genesis | None) -> str:
        if genesis is None:
            raise AuditError(
                "the audit chain has no event 1, so no identity to anchor it under; "
                "run `audit verify`"
            )
        pinned = self.audit.chain_id
        if pinned is not None and genesis.event_hash != pinned:
            raise AnchorConflictError(
                f"refusing to anchor: this ledger's chain is {genesis.event_hash}, but "
                f"audit.chain_id pins {pinned}: another ledger is configured here, or this "
                "one was rewritten from its first event"
            )
        return genesis.event_hash

    def _put_once(self, key: str, body: dict[str, Any]) -> str | None:
        retain_until = None
        if self.store.object_lock_enabled(self.bucket):
            retain_until = datetime.now(UTC) + timedelta(days=self.audit.anchor_retention_days)
        try:
            stored = self.store.put_json(
                key,
                body,
                bucket=self.bucket,
                tags={"kind": "audit-anchor"},
                retain_until=retain_until,
                lock_mode=self.audit.anchor_lock_mode.value,
            )
        except ObjectConflictError as exc:
            raise AnchorConflictError(self._conflict(key, body)) from exc
        return stored.version_id

    def _conflict(self, key: str, body: dict[str, Any]) -> str:
        try:
            found = self._read(key)
            theirs = found.event_hash if found is not None else "not an anchor"
        except StorageError:
            theirs = "unreadable"
        return (
            f"refusing to anchor seq {body['seq']}: s3://{self.bucket}/{key} already holds "
            f"another ledger's anchor for it (hash {theirs}; this ledger has "
            f"{body['event_hash']}). The two start with the same event (is one a copy of "
            "the other's database?), or this chain was rewritten. Anchors are never "
            "overwritten: give this ledger its own storage.prefix, and run `audit verify`"
        )

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

    # -- reading ---------------------------------------------------------------------

    def anchors(self) -> list[Anchor]:
        """This chain's anchors (with the legacy ones that can be its), in seq order."""
        return self.survey().anchors

    def survey(self, *, legacy: bool = True) -> AnchorSurvey:
        """This chain's anchors, and what else stands under the prefix.

        The chain is `audit.chain_id` where pinned (so a ledger that is not that chain
        is checked against the pinned chain's anchors), else this ledger's first event."""
        with self.engine.connect() as conn:
            genesis = read_genesis(conn)
        chain = self.audit.chain_id or (genesis.event_hash if genesis else None)
        keys, folders = self.store.list_children(self.prefix, bucket=self.bucket)
        own = self._chain_anchors(chain) if chain else []
        legacy_keys = [k for k in keys if _LEGACY_NAME.fullmatch(k.rsplit("/", 1)[-1])]
        theirs, skipped = _split_legacy(self._read_all(legacy_keys) if legacy else [], genesis)
        chains = (folder[len(self.prefix) :].rstrip("/") for folder in folders)
        others = sorted(c for c in chains if _CHAIN_ID.fullmatch(c) and c != chain)
        return AnchorSurvey(chain, sorted(own + theirs, key=lambda a: a.seq), skipped, others)

    def _chain_anchors(self, chain: str) -> list[Anchor]:
        keys = self.store.list_keys(f"{self.prefix}{chain}/", bucket=self.bucket)
        found = self._read_all(k for k in keys if k.endswith(".json"))
        for anchor in found:
            if anchor.chain != chain:  # only a hand-made object gets here
                raise StorageFailedError(
                    f"anchor s3://{self.bucket}/{anchor.key} is not one of chain {chain}'s"
                )
        return found

    def _read_all(self, keys: Iterable[str]) -> list[Anchor]:
        return [a for a in (self._read(key) for key in keys) if a is not None]

    def _read(self, key: str) -> Anchor | None:
        """The anchor at `key`; None for an object of another kind."""
        raw = self.store.get_object(key, bucket=self.bucket)
        try:
            body = json.loads(raw)
            if body.get("kind") not in (ANCHOR_KIND, LEGACY_ANCHOR_KIND):
                return None
            chain = str(body["chain"]) if body["kind"] == ANCHOR_KIND else None
            return Anchor(
                int(body["seq"]),
                str(body["event_hash"]),
                str(body["event_at"]),
                key,
                chain=chain,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageFailedError(f"unreadable anchor s3://{self.bucket}/{key}") from exc


def _split_legacy(anchors: list[Anchor], genesis: Genesis | None) -> tuple[list[Anchor], int]:
    """Legacy anchors that can be this chain's, and how many cannot.

    One that anchors an event older than the chain's first event was written by an
    earlier ledger (a chain with no first event has none of its own). The time is bound
    into the chain's first event, so this ledger cannot disown them without a new
    identity. A time that cannot be read keeps the anchor: it is checked."""
    if genesis is None:
        return [], len(anchors)
    mine = [a for a in anchors if not _older(a.event_at, genesis.at)]
    return mine, len(anchors) - len(mine)


def _older(event_at: str, than: datetime) -> bool:
    try:
        return as_utc(datetime.fromisoformat(event_at)) < than
    except ValueError:
        return False
