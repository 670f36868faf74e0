"""The per-request query index, kept in step with the events inside the append.

It is derived data: every column can be recomputed from the events. It is written with
upserts (no read first: each statement is a round trip on every request's path), which
lock the rows they write, so two appends for one request cannot lose an update; and it
is written before the append takes the chain lock, so it adds nothing to the time every
other worker waits for that lock.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Executable, Table, case, func

from zimage_pipeline.ledger.models import AuditRequest, AuditRequestGroup, AuditRequestLabel
from zimage_pipeline.ledger.txn import dialect_insert

INDEX = cast(Table, AuditRequest.__table__)
GROUPS = cast(Table, AuditRequestGroup.__table__)
LABELS = cast(Table, AuditRequestLabel.__table__)


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


# A template id as the catalogue and the request schema spell it (templates/model.py).
TEMPLATE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
MAX_TEMPLATE_VERSION = 2**31 - 1  # the column is a 32-bit INTEGER on PostgreSQL


def template_of(value: Any) -> tuple[str, int | None] | None:
    """The (id, version) a `template` payload mapping names, or None where it names no
    well-formed id: the trail keeps whatever was written, the index only what it can
    answer for. A version that is not a positive integer is left out, the id kept."""
    if not isinstance(value, Mapping):
        return None
    template_id = value.get("id")
    if not isinstance(template_id, str) or TEMPLATE_ID.fullmatch(template_id) is None:
        return None
    version = value.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        return template_id, None
    return template_id, version if 1 <= version <= MAX_TEMPLATE_VERSION else None


def _next_status(current: str | None, event_type: str) -> str | None:
    new = STATUS_OF.get(event_type)
    if new is None or (current in STICKY and new not in STICKY):
        return current
    return new


def update_request_index(conn: Connection, events: Sequence[IndexedEvent]) -> None:
    """Fold `events` (in chain order) into their requests' index rows: one upsert for the
    rows (INSERT ... ON CONFLICT DO UPDATE, which also locks them, so two appends for one
    request cannot lose an update), then the new groups and labels, if any.

    The upsert's inserted values are the fold of this batch alone (what a new row gets);
    ON CONFLICT merges them into the existing row in SQL, with the same rules `fold_events`
    applies event by event (`_merged_columns`)."""
    by_request: dict[str, list[IndexedEvent]] = {}
    for event in events:
        by_request.setdefault(event.request_id, []).append(event)
    rows = [
        {
            "request_id": request_id,
            "first_at": request_events[0].at,
            "events": len(request_events),
            **dict.fromkeys(("subject", "principal", "model", "reason"), None),
            **dict.fromkeys(("prompt_sha256", "prompt_text"), None),
            **dict.fromkeys(("template_id", "template_version"), None),
            **fold_events(None, request_events),
        }
        for request_id, request_events in sorted(by_request.items())  # row-lock order
    ]
    dialect = conn.dialect.name
    conn.execute(_index_upsert(dialect), rows[0] if len(rows) == 1 else rows)
    for request_id, request_events in by_request.items():
        groups = {str(g)[:512] for e in request_events for g in e.payload.get("groups") or ()}
        if groups:
            conn.execute(
                _add_missing(dialect, GROUPS),
                [{"request_id": request_id, "group_name": g} for g in sorted(groups)],
            )
        labels: dict[Any, Any] = {}
        for e in request_events:
            if isinstance(e.payload.get("labels"), Mapping):
                labels.update(e.payload["labels"])
        pairs = {(str(k)[:64], str(v)[:256]) for k, v in labels.items()}
        if pairs:
            conn.execute(
                _add_missing(dialect, LABELS),
                [{"request_id": request_id, "key": k, "value": v} for k, v in sorted(pairs)],
            )


@functools.cache
def _index_upsert(dialect: str) -> Executable:
    """Built once per dialect (see txn.dialect_insert); the rows come as parameters."""
    insert = dialect_insert(dialect, INDEX)
    return insert.on_conflict_do_update(
        index_elements=[INDEX.c.request_id], set_=_merged_columns(insert.excluded)
    )


@functools.cache
def _add_missing(dialect: str, table: Table) -> Executable:
    return dialect_insert(dialect, table).on_conflict_do_nothing()


def _merged_columns(new: Any) -> dict[str, Any]:
    """ON CONFLICT's SET: the existing row (`INDEX.c`) after the batch (`new`, the batch's
    own fold from no status). The batch's fold ends in its last sticky status if it has
    one; otherwise in its last status-moving event's status, which a sticky existing
    status outlives; a batch that moves nothing (its fold is then an event type, not a
    status) keeps the existing status. Other columns: the batch's value where it has one."""
    old = INDEX.c
    sticky, statuses = sorted(STICKY), sorted(STATUSES)
    status = case(
        (new.status.in_(sticky), new.status),
        (old.status.in_(sticky), old.status),
        (new.status.in_(statuses), new.status),
        else_=old.status,
    )
    kept = {c: func.coalesce(new[c], old[c]) for c in ("subject", "principal", "model", "reason")}
    return {
        "status": status,
        **kept,
        "prompt_sha256": func.coalesce(new.prompt_sha256, old.prompt_sha256),
        # Set together with the hash (None where the retention policy keeps no text).
        "prompt_text": case(
            (new.prompt_sha256.is_not(None), new.prompt_text), else_=old.prompt_text
        ),
        # The id and its version are one fact: set together, from the same event.
        "template_id": func.coalesce(new.template_id, old.template_id),
        "template_version": case(
            (new.template_id.is_not(None), new.template_version), else_=old.template_version
        ),
        "last_at": new.last_at,
        "events": old.events + new.events,
    }


def fold_events(status: str | None, events: Sequence[IndexedEvent]) -> dict[str, Any]:
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
        template = template_of(payload.get("template"))
        if template is not None:
            values["template_id"], values["template_version"] = template
    values["status"] = status
    values["last_at"] = events[-1].at
    return values


def _text(value: Any, size: int) -> str | None:
    return None if value is None else str(value)[:size]
