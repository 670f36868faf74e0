"""The per-request query index, kept in step with the events inside the append.

It is derived data: every column can be recomputed from the events, and the append holds
the chain lock while it writes here, so read-then-write needs no further locking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, insert, select, update

from zimage_pipeline.ledger.models import AuditRequest, AuditRequestGroup, AuditRequestLabel

if TYPE_CHECKING:
    from zimage_pipeline.audit.chain import AuditEvent

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


def update_request_index(conn: Connection, event: AuditEvent) -> None:
    payload = event.payload
    subject = payload.get("user") or payload.get("on_behalf_of")
    principal = payload.get("principal")
    model = model_name(payload.get("model"))
    reason = payload.get("reason")
    prompt_sha = payload.get("prompt_sha256")
    prompt_text = (event.prompts or {}).get("prompt")
    row = conn.execute(
        select(AuditRequest.status, AuditRequest.events).where(
            AuditRequest.request_id == event.request_id
        )
    ).one_or_none()
    if row is None:
        conn.execute(
            insert(AuditRequest).values(
                request_id=event.request_id,
                subject=_text(subject, 512),
                principal=_text(principal, 512),
                model=_text(model, 256),
                status=_next_status(None, event.event_type) or event.event_type[:16],
                reason=_text(reason, 64),
                first_at=event.at,
                last_at=event.at,
                events=1,
                prompt_sha256=prompt_sha,
                prompt_text=prompt_text,
            )
        )
    else:
        values: dict[str, Any] = {
            "last_at": event.at,
            "events": row.events + 1,
            "status": _next_status(row.status, event.event_type) or row.status,
        }
        for column, value, size in (
            ("subject", subject, 512),
            ("principal", principal, 512),
            ("model", model, 256),
            ("reason", reason, 64),
        ):
            if value is not None:
                values[column] = _text(value, size)
        if prompt_sha is not None:
            values["prompt_sha256"] = prompt_sha
            values["prompt_text"] = prompt_text
        conn.execute(
            update(AuditRequest).where(AuditRequest.request_id == event.request_id).values(values)
        )
    _add_groups(conn, event.request_id, payload.get("groups"))
    _add_labels(conn, event.request_id, payload.get("labels"))


def _text(value: Any, size: int) -> str | None:
    return None if value is None else str(value)[:size]


def _add_groups(conn: Connection, request_id: str, groups: Any) -> None:
    if not groups:
        return
    wanted = {str(g)[:512] for g in groups}
    have = set(
        conn.scalars(
            select(AuditRequestGroup.group_name).where(AuditRequestGroup.request_id == request_id)
        )
    )
    new = sorted(wanted - have)
    if new:
        conn.execute(
            insert(AuditRequestGroup), [{"request_id": request_id, "group_name": g} for g in new]
        )


def _add_labels(conn: Connection, request_id: str, labels: Any) -> None:
    if not labels or not isinstance(labels, Mapping):
        return
    wanted = {(str(k)[:64], str(v)[:256]) for k, v in labels.items()}
    have = {
        (r.key, r.value)
        for r in conn.execute(
            select(AuditRequestLabel.key, AuditRequestLabel.value).where(
                AuditRequestLabel.request_id == request_id
            )
        )
    }
    new = sorted(wanted - have)
    if new:
        conn.execute(
            insert(AuditRequestLabel),
            [{"request_id": request_id, "key": k, "value": v} for k, v in new],
        )
