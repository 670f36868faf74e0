"""sink outbox: results queued for the result sinks (webhooks), retried until delivered

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sink_outbox",
        sa.Column("delivery_id", sa.String(32), nullable=False),
        sa.Column("sink", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("event", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(512), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_sink_outbox")),
    )
    # The dispatcher's query (due pending rows) and `audit show` (a request's rows).
    op.create_index(
        op.f("ix_sink_outbox_state_next_attempt_at"), "sink_outbox", ["state", "next_attempt_at"]
    )
    op.create_index(op.f("ix_sink_outbox_request_id"), "sink_outbox", ["request_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_sink_outbox_request_id"), table_name="sink_outbox")
    op.drop_index(op.f("ix_sink_outbox_state_next_attempt_at"), table_name="sink_outbox")
    op.drop_table("sink_outbox")
