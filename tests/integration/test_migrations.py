"""Alembic owns the schema: upgrade, downgrade and upgrade again on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

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


def _shape(engine: Engine, table: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """A table's columns (name, nullable, default) and its indexes, unique constraints and
    primary key (name, columns, unique)."""
    inspector = inspect(engine)
    columns = [
        (c["name"], bool(c["nullable"]), c.get("default")) for c in inspector.get_columns(table)
    ]
    pk = inspector.get_pk_constraint(table)
    keys = sorted(
        [
            *(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table)
            ),
            *(
                (u["name"], tuple(u["column_names"]), True)
                for u in inspector.get_unique_constraints(table)
            ),
            (pk["name"], tuple(pk["constrained_columns"]), True),
        ]
    )
    return columns, keys


def test_templates_revision_keeps_rows_and_downgrades_to_the_old_shape(ledger_url: str) -> None:
    """0006 adds the template columns (and the audit index on them) around existing rows,
    and its downgrade gives back exactly the 0005 tables, rows included."""
    engine = create_engine(ledger_url)
    try:
        migrate.upgrade(engine, "0005")
        before = {t: _shape(engine, t) for t in ("jobs", "audit_requests")}
        at = datetime(2026, 12, 1, tzinfo=UTC)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (request_id, payload_sha256, principal, on_behalf_of,"
                    " status, attempts) VALUES ('req-old', :sha, 'cms', 'mia', 'succeeded', 1)"
                ),
                {"sha": "ab" * 32},
            )
            conn.execute(
                text(
                    "INSERT INTO audit_requests (request_id, subject, status, first_at, last_at,"
                    " events) VALUES ('req-old', 'mia', 'published', :at, :at, 7)"
                ),
                {"at": at},
            )

        migrate.upgrade(engine, "0006")
        assert migrate.current_revision(engine) == "0006"
        jobs_columns, _ = _shape(engine, "jobs")
        audit_columns, audit_indexes = _shape(engine, "audit_requests")
        assert {("template_id", True, None), ("template_version", True, None)} <= set(audit_columns)
        assert {
            ("template_id", True, None),
            ("template_version", True, None),
            ("template_sha256", True, None),
        } <= set(jobs_columns)
        assert {
            ("ix_audit_requests_template_id_first_at", ("template_id", "first_at"), False),
            (
                "ix_audit_requests_template_id_template_version_first_at",
                ("template_id", "template_version", "first_at"),
                False,
            ),
        } <= set(audit_indexes)
        with engine.begin() as conn:
            assert conn.execute(
                text("SELECT template_id, template_version, template_sha256 FROM jobs")
            ).all() == [(None, None, None)]
            conn.execute(
                text(
                    "UPDATE jobs SET template_id = 'hero-on-white', template_version = 3,"
                    " template_sha256 = :sha"
                ),
                {"sha": "cd" * 32},
            )
            assert conn.execute(text("SELECT subject, template_id FROM audit_requests")).all() == [
                ("mia", None)
            ]

        migrate.downgrade(engine, "0005")
        assert migrate.current_revision(engine) == "0005"
        assert {t: _shape(engine, t) for t in before} == before
        with engine.connect() as conn:
            assert conn.execute(text("SELECT request_id, status FROM jobs")).all() == [
                ("req-old", "succeeded")
            ]
            assert conn.execute(text("SELECT request_id, events FROM audit_requests")).all() == [
                ("req-old", 7)
            ]
    finally:
        engine.dispose()


def test_sink_publisher_revision_keeps_queued_rows_and_downgrades(ledger_url: str) -> None:
    """0007 adds the outbox's publisher column: a row queued before it keeps its state and
    has no publisher (it goes where every publisher's results go); the downgrade gives
    back the 0006 table, rows included."""
    engine = create_engine(ledger_url)
    try:
        migrate.upgrade(engine, "0006")
        before = _shape(engine, "sink_outbox")
        at = datetime(2026, 12, 1, tzinfo=UTC)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sink_outbox (delivery_id, sink, request_id, event, state,"
                    " attempts, next_attempt_at, created_at, updated_at) VALUES"
                    " (:id, 'webhook', 'req-old', '{}', 'pending', 0, :at, :at, :at)"
                ),
                {"id": "d" * 32, "at": at},
            )

        migrate.upgrade(engine, "0007")
        columns, _ = _shape(engine, "sink_outbox")
        assert ("publisher", True, None) in columns
        with engine.connect() as conn:
            assert conn.execute(text("SELECT state, publisher FROM sink_outbox")).all() == [
                ("pending", None)
            ]

        migrate.downgrade(engine, "0006")
        assert _shape(engine, "sink_outbox") == before
        with engine.connect() as conn:
            assert conn.execute(text("SELECT request_id, state FROM sink_outbox")).all() == [
                ("req-old", "pending")
            ]
    finally:
        engine.dispose()
