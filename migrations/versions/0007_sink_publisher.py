"""sink outbox publisher: whose result each queued delivery is, for per-tenant routing

`sink_outbox.publisher` is the AMQP account that published the request (the tenant). A
result sink routes by it (the webhook's `publishers` table): one tenant's results never
go to another tenant's receivers. Rows queued before this revision have none and go
where every publisher's results go.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: a plain ADD COLUMN on both backends, no rewrite.
    with op.batch_alter_table("sink_outbox") as batch:
        batch.add_column(sa.Column("publisher", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sink_outbox") as batch:
        batch.drop_column("publisher")
