"""Alembic environment: the URL comes from the project's settings, or from the caller.

`zimage-pipeline db upgrade` passes an open connection through `config.attributes`, so
tests and the CLI migrate exactly the database they were given.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.models import Base
from zimage_pipeline.settings import load_settings

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_ledger_engine(load_settings().database)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
