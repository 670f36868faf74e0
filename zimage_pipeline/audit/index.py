"""The per-request query index, kept in step with the events inside the append.

It is derived data: every column can be recomputed from the events. The rows read are
locked (FOR UPDATE) so two appends for one request cannot lose an update, and the index
is written before the append takes the chain lock, so it adds nothing to the time every
other worker waits for that lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, insert, select, update

from zimage_pipeline.ledger.models import AuditRequest, AuditRequestGroup, AuditRequestLabel


class IndexedEvent(Protocol):
    """What the index reads of an event: not its place in the chain, so the index can be
    written before the append takes the chain lock."""

    @property
    def request_id(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def event_type(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    @property
    def prompts(self) -> dict[str, str] | None: ...


# Which events move a request's status; quota movements do not.
STATUS_OF = {
    "received": "received",
    "authorized": "authorized",
    "denied": "denied",
    "generated": "generated",
    "stored": "stored",
    "published": "published",
    "failed": "failed",
    "cancelled": "cancelled",
    "expired": "expired",
}
# A request that ended badly stays so: a later `published` (of the failure) or a
# `quota_released` does not hide it.
STICKY = frozenset({"denied", "failed", "cancelled", "expired"})
STATUSES = frozenset(STATUS_OF.values())


def model_name(value: Any) -> str | None:
    """`model` as a string; a {name, revision} mapping becomes `name@revision`."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        name, revision = value.get("name"), value.get("revision")
        return f"{name}@{revision}" if revision else (str(name) if name else None)
    return str(value)


def _next_status(current: str | None, event_type: str) -> str | None:
    new = STATUS_OF.get(event_type)
    if new is None or (current in STICKY and new not in STICKY):
        return current
    return new


def update_request_index(conn: Connection, events: Sequence[IndexedEvent]) -> None:
    """Fold `events` (in chain order) into their requests' index rows: one read of the
    rows they touch, then one write per request (plus new groups and labels)."""
    by_request: dict[str, list[IndexedEvent]] = {}
    for event in events:
        by_request.setdefault(event.request_id, []).append(event)
    existing = {
        row.request_id: row
        for row in conn.execute(
            select(AuditRequest.request_id, AuditRequest.status, AuditRequest.events)
            .where(AuditRequest.request_id.in_(list(by_request)))
            .with_for_update()
        )
    }
    new_rows: list[dict[str, Any]] = []
    for request_id, request_events in by_request.items():
        row = existing.get(request_id)
        values = _folded(row.status if row else None, request_events)
        if row is None:
            new_rows.append(
                {
                    "request_id": request_id,
                    "first_at": request_events[0].at,
                    "events": len(request_events),
                    "subject": None,
                    "principal": None,
                    "model": None,
                    "reason": None,
                    "prompt_sha256": None,
                    "prompt_text": None,
                    **values,
                }
            )
        else:
            values["events"] = row.events + len(request_events)
            conn.execute(
                update(AuditRequest).where(AuditRequest.request_id == request_id).values(values)
            )
    if new_rows:
        conn.execute(insert(AuditRequest), new_rows)
    for request_id, request_events in by_request.items():
        # A request first indexed now has no groups or labels yet: nothing to read.
        known = request_id in existing
        groups = [g for e in request_events for g in e.payload.get("groups") or ()]
        _add_groups(conn, request_id, groups, known=known)
        labels: dict[Any, Any] = {}
        for e in request_events:
            if isinstance(e.payload.get("labels"), Mapping):
                labels.update(e.payload["labels"])
        _add_labels(conn, request_id, labels, known=known)


def _folded(status: str | None, events: Sequence[IndexedEvent]) -> dict[str, Any]:
    """The index columns after `events`: the latest non-null value of each wins."""
    values: dict[str, Any] = {}
    for event in events:
        payload = event.payload
        status = _next_status(status, event.event_type) or status or event.event_type[:16]
        for column, value, size in (
            ("subject", payload.get("user") or payload.get("on_behalf_of"), 512),
            ("principal", payload.get("principal"), 512),
            ("model", model_name(payload.get("model")), 256),
            ("reason", payload.get("reason"), 64),
        ):
            if value is not None:
                values[column] = _text(value, size)
        if payload.get("prompt_sha256") is not None:
            values["prompt_sha256"] = payload["prompt_sha256"]
            values["prompt_text"] = (event.prompts or {}).get("prompt")
    values["status"] = status
    values["last_at"] = events[-1].at
    return values


def _text(value: Any, size: int) -> str | None:
    return None if value is None else str(value)[:size]


def _add_groups(conn: Connection, request_id: str, groups: Any, *, known: bool) -> None:
    if not groups:
        return
    wanted = {str(g)[:512] for g in groups}
    have = (
        set(
            conn.scalars(
                select(AuditRequestGroup.group_name).where(
                    AuditRequestGroup.request_id == request_id
                )
            )
        )
        if known
        else set()
    )
    new = sorted(wanted - have)
    if new:
        conn.execute(
            insert(AuditRequestGroup), [{"request_id": request_id, "group_name": g} for g in new]
        )


def _add_labels(conn: Connection, request_id: str, labels: Any, *, known: bool) -> None:
    if not labels or not isinstance(labels, Mapping):
        return
    wanted = {(str(k)[:64], str(v)[:256]) for k, v in labels.items()}
    have = (
        {
            (r.key, r.value)
            for r in conn.execute(
                select(AuditRequestLabel.key, AuditRequestLabel.value).where(
                    AuditRequestLabel.request_id == request_id
                )
            )
        }
        if known
        else set()
    )
    new = sorted(wanted - have)
    if new:
        conn.execute(
            insert(AuditRequestLabel),
            [{"request_id": request_id, "key": k, "value": v} for k, v in new],
        )
