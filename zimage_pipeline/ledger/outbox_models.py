"""ORM model of the result sinks' outbox (revision 0005), on the ledger's one metadata.

Kept beside models.py rather than in it; `zimage_pipeline/ledger/__init__.py` imports
this module, so whoever imports the ledger's `Base` (Alembic's env.py, the schema tests)
sees the table too.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from zimage_pipeline.ledger.models import Base

DELIVERY_ID_LENGTH = 32
LAST_ERROR_LENGTH = 512


class DeliveryState(StrEnum):
    PENDING = "pending"  # due at next_attempt_at (or claimed by a worker until then)
    DELIVERED = "delivered"
    DEAD = "dead"  # out of attempts, or never queued (outbox full): nothing more happens


class SinkOutboxRow(Base):
    """One result for one sink. The id is derived from (sink, request), so queueing a
    result again (a republish of a stored result) inserts nothing. A pending row is
    claimed by moving `next_attempt_at` into the future (a lease): only the worker whose
    conditional UPDATE matched the old value delivers that attempt."""

    __tablename__ = "sink_outbox"
    __table_args__ = (Index(None, "state", "next_attempt_at"),)

    delivery_id: Mapped[str] = mapped_column(String(DELIVERY_ID_LENGTH), primary_key=True)
    sink: Mapped[str] = mapped_column(String(128), nullable=False)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    # The AMQP account that published the request (revision 0007): sinks route by it.
    publisher: Mapped[str | None] = mapped_column(String(256))
    event: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    # Attempts started: a claim counts one, so a worker that dies mid-attempt still
    # uses it up, and a result that kills its deliverer cannot be retried forever.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_error: Mapped[str | None] = mapped_column(String(LAST_ERROR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
