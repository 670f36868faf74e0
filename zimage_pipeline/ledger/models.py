"""ORM models of the ledger. Alembic revisions in migrations/ own the schema."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so that migrations can drop them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(StrEnum):
    RECEIVED = "received"
    AUTHORIZED = "authorized"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Job(Base):
    """One row per request_id: the request's state machine and who handled it."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    payload_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    principal: Mapped[str] = mapped_column(String(256), nullable=False)
    on_behalf_of: Mapped[str] = mapped_column(String(256), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    reason: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    roles_snapshot: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The template the request was rendered from (revision 0006); NULL for a free prompt.
    template_id: Mapped[str | None] = mapped_column(String(64))
    template_version: Mapped[int | None] = mapped_column(Integer)
    template_sha256: Mapped[str | None] = mapped_column(String(64))


# --- Quota (revision 0002). Subjects are "user:<username>" or "team:<group DN>". ---


class QuotaLimit(Base):
    """An administrator's override of a subject's limits (`quota set`); NULL = no override."""

    __tablename__ = "quota_limits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(512), unique=True, nullable=False)
    images_per_day: Mapped[int | None] = mapped_column(Integer)
    images_per_month: Mapped[int | None] = mapped_column(Integer)
    updated_by: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class QuotaCounter(Base):
    """Running totals of one subject in one UTC window; the row that reservations lock."""

    __tablename__ = "quota_counters"
    __table_args__ = (UniqueConstraint("subject", "window_kind", "period"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(512), nullable=False)
    window_kind: Mapped[str] = mapped_column(String(8), nullable=False)
    period: Mapped[str] = mapped_column(String(10), nullable=False)
    used: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reserved: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    granted: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class QuotaReservation(Base):
    """One leased hold per request_id on the counters of every subject it charges."""

    __tablename__ = "quota_reservations"
    __table_args__ = (Index(None, "state", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    subjects: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    day: Mapped[str] = mapped_column(String(10), nullable=False)
    month: Mapped[str] = mapped_column(String(7), nullable=False)
    images: Mapped[int] = mapped_column(Integer, nullable=False)
    committed: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class QuotaEntry(Base):
    """Append-only movement; unique (request_id, kind) makes redelivery unable to charge twice."""

    __tablename__ = "quota_entries"
    __table_args__ = (UniqueConstraint("request_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    subject: Mapped[str] = mapped_column(String(512), nullable=False, index=True)
    images: Mapped[int] = mapped_column(Integer, nullable=False)
    actor: Mapped[str | None] = mapped_column(String(256))
    note: Mapped[str | None] = mapped_column(String(512))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


# -- audit trail (revision 0003) ----------------------------------------------------------


class AuditEventRow(Base):
    """One audit event, hash-chained: `event_hash` covers seq, time, ids, the canonical
    payload text and `prev_hash`. `prompt_text` is outside the hash (its SHA-256 is in the
    payload), so prompt retention can remove it without breaking the chain."""

    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "request_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    event_type: Mapped[str] = mapped_column(String(32), nullable=False)
    actor: Mapped[str] = mapped_column(String(256), nullable=False)
    payload: Mapped[str] = mapped_column(Text, nullable=False)
    prompt_text: Mapped[str | None] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    event_hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditChainHead(Base):
    """The single row (id 1) every append locks: it serialises writers across workers."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditRequest(Base):
    """Per-request index derived from the events (kept in the same transaction), for the
    compliance queries; the events stay the record."""

    __tablename__ = "audit_requests"
    __table_args__ = (
        Index(None, "subject", "first_at"),
        Index(None, "status", "first_at"),
        Index(None, "model", "first_at"),
        Index(None, "reason", "first_at"),
        Index(None, "template_id", "first_at"),
        # One version of a template ("made before the colour changed"): versions follow
        # time, so the (template_id, first_at) range alone reads past every later one.
        Index(None, "template_id", "template_version", "first_at"),
    )

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    subject: Mapped[str | None] = mapped_column(String(512))
    principal: Mapped[str | None] = mapped_column(String(512))
    model: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(String(64))
    first_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    last_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    events: Mapped[int] = mapped_column(Integer, nullable=False)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    prompt_text: Mapped[str | None] = mapped_column(Text)
    # From the `received` event's `template` mapping (revision 0006); NULL for a free prompt.
    template_id: Mapped[str | None] = mapped_column(String(64))
    template_version: Mapped[int | None] = mapped_column(Integer)


class AuditRequestGroup(Base):
    __tablename__ = "audit_request_groups"
    __table_args__ = (Index(None, "group_name", "request_id"),)

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(512), primary_key=True)


class AuditRequestLabel(Base):
    """Labels a client attached (CMS asset id, SKU, ...), searchable by value."""

    __tablename__ = "audit_request_labels"
    __table_args__ = (Index(None, "value", "key"),)

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), primary_key=True)


# -- output discards (revision 0004) -------------------------------------------------------


class OutputDiscard(Base):
    """A request that ended without success after its upload began: the objects it may
    have stored are to be deleted. The row is written in the transaction that ends the
    job and removed in the one that records the deletion, so a deletion that cannot run
    now (the object store is down) is never forgotten."""

    __tablename__ = "output_discards"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_error: Mapped[str | None] = mapped_column(String(512))
