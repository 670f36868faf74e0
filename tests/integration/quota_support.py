"""Shared helpers of the ledger tests: a migrated engine and direct counter reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, func, select

from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.quota_rows import COUNTERS, ENTRIES, RESERVATIONS
from zimage_pipeline.settings import DatabaseSettings


@contextmanager
def migrated_engine(url: str, *, pool_size: int = 5) -> Iterator[Engine]:
    engine = create_ledger_engine(DatabaseSettings(url=url, pool_size=pool_size))
    try:
        migrate.upgrade(engine)
        yield engine
    finally:
        engine.dispose()


def counter(engine: Engine, subject: str, window: str) -> tuple[int, int, int]:
    """(used, reserved, granted) summed over every period of `window`."""
    with engine.connect() as connection:
        row = connection.execute(
            select(
                func.coalesce(func.sum(COUNTERS.c.used), 0),
                func.coalesce(func.sum(COUNTERS.c.reserved), 0),
                func.coalesce(func.sum(COUNTERS.c.granted), 0),
            ).where(COUNTERS.c.subject == subject, COUNTERS.c.window_kind == window)
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


def reservation_totals(engine: Engine) -> dict[str, int]:
    """Images per reservation state: committed count their committed images."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(RESERVATIONS.c.state, RESERVATIONS.c.images, RESERVATIONS.c.committed)
        ).all()
    totals: dict[str, int] = {}
    for state, images, committed in rows:
        totals[state] = totals.get(state, 0) + (committed if state == "committed" else images)
    return totals


def entry_kinds(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(ENTRIES.c.kind, func.count()).group_by(ENTRIES.c.kind)
        ).all()
    return {kind: int(count) for kind, count in rows}
