"""Alembic owns the schema: upgrade, downgrade and upgrade again on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.models import Base

pytestmark = pytest.mark.integration


def test_upgrade_downgrade_upgrade(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    try:
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables

        migrate.downgrade(engine, "base")
        assert migrate.current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()


def test_models_match_migrations(ledger_url: str) -> None:
    """The ORM models and the migrated schema agree (no forgotten revision)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(ledger_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], diff
    finally:
        engine.dispose()
