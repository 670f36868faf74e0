"""The SQL ledger: jobs, quota movements and audit events (SQLAlchemy 2, Alembic)."""

# Tables defined outside models.py join the one metadata when the package is imported,
# so that `from zimage_pipeline.ledger.models import Base` always sees every table
# (Alembic's env.py, the schema comparison in the tests).
from zimage_pipeline.ledger import outbox_models as _outbox_models  # noqa: F401
