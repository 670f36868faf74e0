"""The SQL ledger: jobs, quota movements and audit events (SQLAlchemy 2, Alembic)."""
