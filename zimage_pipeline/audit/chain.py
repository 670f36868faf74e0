"""The append-only, hash-chained audit log.

Every event gets the next `seq` and stores the hash of its predecessor (`prev_hash`) and
its own hash over a canonical encoding of (seq, time, request, type, actor, payload,
prev_hash). Changing, deleting, inserting or reordering any row breaks the chain at that
row; `verify` names it.

One global chain, serialised by the single `audit_chain_head` row: an append's first
statement is `UPDATE audit_chain_head SET seq = seq + 1 ... RETURNING`, which takes the
row lock on PostgreSQL and SQLite's write lock, so concurrent workers queue there and
each sees the committed head of the one before. The lock is held until the caller's
transaction ends: an append takes it last (after the index rows) and holds it for two
statements; callers put the append at the end of their transactions. Event times are
taken before the lock, so two concurrent appends may be a few milliseconds out of time
order in the chain; the chain order (seq) is the record.

Prompts: the payload keeps only `prompt_sha256` (and `negative_prompt_sha256`); the text
itself goes to `prompt_text`, outside the hash, so the retention policy can drop it
(`hash`: never stored; `redact`: removed after N days) and the chain still verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, update

from zimage_pipeline.audit.errors import AuditError
from zimage_pipeline.audit.index import update_request_index
from zimage_pipeline.ledger.models import AuditChainHead, AuditEventRow
from zimage_pipeline.ledger.txn import run_write
from zimage_pipeline.ports import AuditRecord
from zimage_pipeline.settings import AuditSettings, PromptRetention

GENESIS_HASH = "0" * 64
HASH_VERSION = 1
EVENT_TYPES = frozenset(
    {
        "received",
        "authorized",
        "denied",
        "denied_summary",  # junk_audit: one per publisher and window past its budget
        "quota_reserved",
        "quota_committed",
        "quota_released",
        "generated",
        "postprocessed",  # the post-processor plugins' derived images (renditions)
        "stored",
        "published",
        "failed",
        "cancelled",
        "expired",
        "outputs_discarded",
        "outputs_discard_abandoned",
        "quota_limit_set",
        "quota_granted",
    }
)
PROMPT_FIELDS = ("prompt", "negative_prompt")


# The append's statements, built once (building one costs more Python time than its
# round trip); values come as parameters.
_ADVANCE_HEAD = (
    update(AuditChainHead)
    .where(AuditChainHead.id == 1)
    .values(seq=AuditChainHead.seq + bindparam("n"))
    .returning(AuditChainHead.seq, AuditChainHead.event_hash)
)
_INSERT_EVENTS = insert(AuditEventRow)
_SET_HEAD_HASH = update(AuditChainHead).where(AuditChainHead.id == 1)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    seq: int
    at: datetime
    request_id: str
    event_type: str
    actor: str
    payload: dict[str, Any]
    prev_hash: str
    event_hash: str
    prompts: dict[str, str] | None = None  # retained prompt texts, outside the hash


@dataclass(frozen=True, slots=True)
class _Indexed:
    request_id: str
    at: datetime
    event_type: str
    payload: dict[str, Any]
    prompts: dict[str, str] | None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"not JSON serialisable in an audit payload: {type(value).__name__}")


def canonical(obj: Any) -> str:
    return json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything the ledger stores is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_time(value: datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(
    *,
    seq: int,
    at: datetime,
    request_id: str,
    event_type: str,
    actor: str,
    payload_text: str,
    prev_hash: str,
) -> str:
    """SHA-256 over a JSON array: unambiguous, and the payload is hashed as stored."""
    fields = [HASH_VERSION, seq, format_time(at), request_id, event_type, actor, prev_hash]
    return sha256_text(canonical([*fields, payload_text]))


def split_prompts(payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(payload with prompt texts replaced by their SHA-256, the texts)."""
    hashed = dict(payload)
    texts: dict[str, str] = {}
    for name in PROMPT_FIELDS:
        value = hashed.pop(name, None)
        if value is not None:
            texts[name] = str(value)
            hashed[f"{name}_sha256"] = sha256_text(str(value))
    return hashed, texts


class AuditLog:
    def __init__(
        self, engine: Engine, *, prompt_retention: PromptRetention = PromptRetention.KEEP
    ) -> None:
        self.engine = engine
        self.prompt_retention = prompt_retention

    @classmethod
    def from_settings(cls, engine: Engine, settings: AuditSettings) -> AuditLog:
        return cls(engine, prompt_retention=settings.prompt_retention)

    def append(
        self,
        *,
        request_id: str,
        event_type: str,
        actor: str,
        payload: Mapping[str, Any],
        at: datetime | None = None,
        connection: Connection | None = None,
    ) -> AuditEvent:
        """Append one event. With `connection`, it joins the caller's transaction (the
        worker commits quota and audit together); without, it commits on its own.

        Payload keys the query index understands: `user` (or `on_behalf_of`),
        `principal`, `groups` (list), `model`, `labels` ({key: value}), `reason`,
        `prompt`, `negative_prompt`, `template` ({id, version, ...}: the id and version
        are indexed). Anything else JSON-serialisable is kept as is.
        """
        record = AuditRecord(request_id, event_type, actor, payload)
        return self.append_many([record], at=at, connection=connection)[0]

    def append_many(
        self,
        records: Sequence[AuditRecord],
        *,
        at: datetime | None = None,
        connection: Connection | None = None,
    ) -> list[AuditEvent]:
        """Append several events in order, holding the chain lock once.

        Three statements for the chain whatever the count (advance the head by n, insert
        the n rows, store the last hash) plus the index's: every statement under the
        lock is a round trip that every other worker waits for (bench/NOTES.md)."""
        if not records:
            return []
        for record in records:
            if record.event_type not in EVENT_TYPES:
                raise AuditError(f"unknown audit event type {record.event_type!r}")
        prepared = [self._prepare(r) for r in records]  # hashing payloads: before the lock
        if connection is not None:
            return self._append_prepared(connection, records, prepared, at)
        # An unreachable ledger raises LedgerUnavailableError (a DependencyUnavailable).
        return run_write(self.engine, lambda own: self._append_prepared(own, records, prepared, at))

    def _prepare(self, record: AuditRecord) -> tuple[dict[str, Any], str, dict[str, str] | None]:
        hashed_payload, prompts = split_prompts(record.payload)
        try:
            payload_text = canonical(hashed_payload)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit payload for {record.request_id}: {exc}") from exc
        kept = prompts if prompts and self.prompt_retention != PromptRetention.HASH else None
        return hashed_payload, payload_text, kept

    def _append_prepared(
        self,
        conn: Connection,
        records: Sequence[AuditRecord],
        prepared: Sequence[tuple[dict[str, Any], str, dict[str, str] | None]],
        at: datetime | None,
    ) -> list[AuditEvent]:
        when = as_utc(at) if at is not None else datetime.now(UTC)
        update_request_index(
            conn,
            [
                _Indexed(r.request_id, when, r.event_type, hashed_payload, kept)
                for r, (hashed_payload, _, kept) in zip(records, prepared, strict=True)
            ],
        )
        # The lock: the first write of the append takes the head row (see module doc).
        # Held from here to the caller's commit: two statements, nothing else.
        last_seq, prev_hash = conn.execute(_ADVANCE_HEAD, {"n": len(records)}).one()
        events: list[AuditEvent] = []
        rows: list[dict[str, Any]] = []
        seq = last_seq - len(records)
        for record, (hashed_payload, payload_text, kept) in zip(records, prepared, strict=True):
            seq += 1
            digest = event_hash(
                seq=seq,
                at=when,
                request_id=record.request_id,
                event_type=record.event_type,
                actor=record.actor,
                payload_text=payload_text,
                prev_hash=prev_hash,
            )
            rows.append(
                {
                    "seq": seq,
                    "at": when,
                    "request_id": record.request_id,
                    "event_type": record.event_type,
                    "actor": record.actor,
                    "payload": payload_text,
                    "prompt_text": canonical(kept) if kept else None,
                    "prev_hash": prev_hash,
                    "event_hash": digest,
                }
            )
            events.append(
                AuditEvent(
                    seq,
                    when,
                    record.request_id,
                    record.event_type,
                    record.actor,
                    hashed_payload,
                    prev_hash,
                    digest,
                    kept,
                )
            )
            prev_hash = digest
        conn.execute(_INSERT_EVENTS, rows)
        conn.execute(_SET_HEAD_HASH, {"event_hash": prev_hash})
        return events
