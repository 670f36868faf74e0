"""templates: the template a request was made from, on the job row and in the audit index

`audit_requests.template_id` / `template_version` are folded from the `received` event's
`template` mapping and indexed `(template_id, first_at)` like the other filters, so
`audit query --template ID` is an index range scan, and `(template_id, template_version,
first_at)` for `--template-version`; the job row records the id, the version and the
catalogue file's SHA-256 the request was rendered with.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: a plain ADD COLUMN on both backends, no rewrite.
    with op.batch_alter_table("audit_requests") as batch:
        batch.add_column(sa.Column("template_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("template_version", sa.Integer(), nullable=True))
    for columns in (["template_id", "first_at"], ["template_id", "template_version", "first_at"]):
        op.create_index(op.f(f"ix_audit_requests_{'_'.join(columns)}"), "audit_requests", columns)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("template_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("template_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("template_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("template_sha256")
        batch.drop_column("template_version")
        batch.drop_column("template_id")
    for name in ("template_id_template_version_first_at", "template_id_first_at"):
        op.drop_index(op.f(f"ix_audit_requests_{name}"), table_name="audit_requests")
    with op.batch_alter_table("audit_requests") as batch:
        batch.drop_column("template_version")
        batch.drop_column("template_id")
