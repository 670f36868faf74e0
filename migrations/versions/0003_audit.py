"""audit: hash-chained events, the chain head, and the per-request query index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("event_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])
    op.create_index(op.f("ix_audit_events_request_id_seq"), "audit_events", ["request_id", "seq"])

    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )
    # The one row every append locks; seq 0 and the genesis hash start the chain.
    op.bulk_insert(head, [{"id": 1, "seq": 0, "event_hash": GENESIS_HASH}])

    op.create_table(
        "audit_requests",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(512), nullable=True),
        sa.Column("principal", sa.String(512), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("prompt_sha256", sa.String(64), nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_audit_requests")),
    )
    for columns in (["first_at"], ["subject", "first_at"], ["status", "first_at"]):
        op.create_index(op.f(f"ix_audit_requests_{'_'.join(columns)}"), "audit_requests", columns)
    for columns in (["model", "first_at"], ["reason", "first_at"]):
        op.create_index(op.f(f"ix_audit_requests_{'_'.join(columns)}"), "audit_requests", columns)

    op.create_table(
        "audit_request_groups",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("group_name", sa.String(512), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "group_name", name=op.f("pk_audit_request_groups")),
    )
    op.create_index(
        op.f("ix_audit_request_groups_group_name_request_id"),
        "audit_request_groups",
        ["group_name", "request_id"],
    )
    op.create_table(
        "audit_request_labels",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "key", "value", name=op.f("pk_audit_request_labels")),
    )
    op.create_index(
        op.f("ix_audit_request_labels_value_key"), "audit_request_labels", ["value", "key"]
    )


def downgrade() -> None:
    op.drop_table("audit_request_labels")
    op.drop_table("audit_request_groups")
    op.drop_table("audit_requests")
    op.drop_table("audit_chain_head")
    op.drop_table("audit_events")
