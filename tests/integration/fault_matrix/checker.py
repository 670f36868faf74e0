"""Run the invariant checker against the real services a matrix case used."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from tests.integration.fault_matrix.invariants import (
    BrokerView,
    ObjectInfo,
    World,
    find_problems,
    format_problems,
    read_ledger,
)
from tests.integration.fault_matrix.stack import ResultTap
from zimage_pipeline.audit import ChainAnchorer, verify_chain
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.settings import Settings
from zimage_pipeline.storage import ObjectStore


def read_objects(store: ObjectStore, prefix: str) -> dict[str, ObjectInfo]:
    """Every object under the case's private prefix in the images bucket, with the
    digest and request id our uploads record in its metadata."""
    found: dict[str, ObjectInfo] = {}
    for key in store.list_keys(f"{prefix.strip('/')}/"):
        head = store.client.head_object(Bucket=store.settings.bucket, Key=key)
        meta = {k.lower(): unquote(v) for k, v in head.get("Metadata", {}).items()}
        found[key] = ObjectInfo(
            key=key,
            sha256=meta.get("sha256"),
            size=int(head.get("ContentLength", 0)),
            request_id=meta.get("request-id"),
        )
    return found


def collect(
    settings: Settings, results: Sequence[Mapping[str, Any]], broker: BrokerView | None = None
) -> World:
    engine = create_ledger_engine(settings.database)
    try:
        world = read_ledger(engine)
        store = ObjectStore(settings.storage)
        world.objects = read_objects(store, settings.storage.prefix)
        anchorer = ChainAnchorer(engine, store, storage=settings.storage, audit=settings.audit)
        report = verify_chain(engine, anchors=anchorer.anchors())
        world.chain_problems = [p.describe() for p in report.problems]
        if report.events_checked == 0:
            world.chain_problems.append("no audit events at all: nothing was recorded")
    finally:
        engine.dispose()
    world.results = list(results)
    world.broker = broker
    return world


def assert_invariants(
    settings: Settings,
    tap: ResultTap,
    *,
    expected: Collection[str] = (),
    extra_results: int = 0,
) -> World:
    """Fail with every broken invariant named; return the snapshot for further asserts.
    Call it after the case's `case_stack` has closed: the broker side (what is left in
    the queues) is read as it closes."""
    world = collect(settings, tap.results, tap.broker)
    world.result_publishers = list(tap.publishers)
    problems = find_problems(world, expected=expected, extra_results=extra_results)
    assert not problems, format_problems(problems)
    return world
