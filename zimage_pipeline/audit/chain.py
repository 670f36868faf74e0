"""The append-only, hash-chained audit log.

Every event gets the next `seq` and stores the hash of its predecessor (`prev_hash`) and
its own hash over a canonical encoding of (seq, time, request, type, actor, payload,
prev_hash). Changing, deleting, inserting or reordering any row breaks the chain at that
row; `verify` names it.

One global chain, serialised by the single `audit_chain_head` row: an append's first
statement is `UPDATE audit_chain_head SET seq = seq + 1 ... RETURNING`, which takes the
row lock on PostgreSQL and SQLite's write lock, so concurrent workers queue there and
each sees the committed head of the one before. The lock is held until the caller's
transaction ends: keep what follows an append in the same transaction short.

Prompts: the payload keeps only `prompt_sha256` (and `negative_prompt_sha256`); the text
itself goes to `prompt_text`, outside the hash, so the retention policy can drop it
(`hash`: never stored; `redact`: removed after N days) and the chain still verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from sqlalchemy import Connection, Engine, insert, update
from sqlalchemy.exc import OperationalError

from zimage_pipeline.audit.errors import AuditError
from zimage_pipeline.audit.index import update_request_index
from zimage_pipeline.errors import DependencyUnavailable
from zimage_pipeline.ledger.models import AuditChainHead, AuditEventRow
from zimage_pipeline.settings import AuditSettings, PromptRetention

GENESIS_HASH = "0" * 64
HASH_VERSION = 1
EVENT_TYPES = frozenset(
    {
        "received",
        "authorized",
        "denied",
        "quota_reserved",
        "quota_committed",
        "quota_released",
        "generated",
        "stored",
        "published",
        "failed",
        "cancelled",
        "expired",
    }
)
PROMPT_FIELDS = ("prompt", "negative_prompt")


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
        `prompt`, `negative_prompt`. Anything else JSON-serialisable is kept as is.
        """
        if event_type not in EVENT_TYPES:
            raise AuditError(f"unknown audit event type {event_type!r}")
        if connection is not None:
            return self._append(connection, request_id, event_type, actor, payload, at)
        try:
            with self.engine.begin() as own:
                return self._append(own, request_id, event_type, actor, payload, at)
        except OperationalError as exc:
            raise DependencyUnavailable(f"audit append: ledger unavailable: {exc.orig}") from exc

    def _append(
        self,
        conn: Connection,
        request_id: str,
        event_type: str,
        actor: str,
        payload: Mapping[str, Any],
        at: datetime | None,
    ) -> AuditEvent:
        hashed_payload, prompts = split_prompts(payload)
        try:
            payload_text = canonical(hashed_payload)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit payload for {request_id}: {exc}") from exc
        # The lock: the first write of the append takes the head row (see module doc).
        seq, prev_hash = conn.execute(
            update(AuditChainHead)
            .where(AuditChainHead.id == 1)
            .values(seq=AuditChainHead.seq + 1)
            .returning(AuditChainHead.seq, AuditChainHead.event_hash)
        ).one()
        # Taken after the lock, so times follow the chain order on each host.
        when = as_utc(at) if at is not None else datetime.now(UTC)
        digest = event_hash(
            seq=seq,
            at=when,
            request_id=request_id,
            event_type=event_type,
            actor=actor,
            payload_text=payload_text,
            prev_hash=prev_hash,
        )
        kept = prompts if prompts and self.prompt_retention != PromptRetention.HASH else None
        conn.execute(
            insert(AuditEventRow).values(
                seq=seq,
                at=when,
                request_id=request_id,
                event_type=event_type,
                actor=actor,
                payload=payload_text,
                prompt_text=canonical(kept) if kept else None,
                prev_hash=prev_hash,
                event_hash=digest,
            )
        )
        conn.execute(update(AuditChainHead).where(AuditChainHead.id == 1).values(event_hash=digest))
        event = AuditEvent(
            seq, when, request_id, event_type, actor, hashed_payload, prev_hash, digest, kept
        )
        update_request_index(conn, event)
        return event
