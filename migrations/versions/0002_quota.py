"""quota: limits, per-window counters, leased reservations, append-only entries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "quota_limits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("images_per_day", sa.Integer(), nullable=True),
        sa.Column("images_per_month", sa.Integer(), nullable=True),
        sa.Column("updated_by", sa.String(256), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_limits")),
        sa.UniqueConstraint("subject", name=op.f("uq_quota_limits_subject")),
    )
    op.create_table(
        "quota_counters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("window_kind", sa.String(8), nullable=False),
        sa.Column("period", sa.String(10), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("reserved", sa.Integer(), nullable=False),
        sa.Column("granted", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_counters")),
        sa.UniqueConstraint(
            "subject",
            "window_kind",
            "period",
            name=op.f("uq_quota_counters_subject_window_kind_period"),
        ),
    )
    op.create_table(
        "quota_reservations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("subjects", sa.JSON(), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("committed", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_reservations")),
        sa.UniqueConstraint("request_id", name=op.f("uq_quota_reservations_request_id")),
    )
    op.create_index(
        op.f("ix_quota_reservations_state_lease_expires_at"),
        "quota_reservations",
        ["state", "lease_expires_at"],
    )
    op.create_table(
        "quota_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(256), nullable=True),
        sa.Column("note", sa.String(512), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_entries")),
        sa.UniqueConstraint("request_id", "kind", name=op.f("uq_quota_entries_request_id_kind")),
    )
    op.create_index(op.f("ix_quota_entries_subject"), "quota_entries", ["subject"])


def downgrade() -> None:
    op.drop_index(op.f("ix_quota_entries_subject"), table_name="quota_entries")
    op.drop_table("quota_entries")
    op.drop_index(
        op.f("ix_quota_reservations_state_lease_expires_at"), table_name="quota_reservations"
    )
    op.drop_table("quota_reservations")
    op.drop_table("quota_counters")
    op.drop_table("quota_limits")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("finished_at")
