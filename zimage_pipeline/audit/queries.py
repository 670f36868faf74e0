"""Compliance queries: which requests match, and one request's whole story.

Filters run on the per-request index (`audit_requests` and its group and label tables),
each backed by an index that leads with the filtered column (user, status, model, reason,
template) and then `first_at`, so a filter plus a time range plus newest-first paging
stays an index range scan at millions of events. Prompt text search is a substring match
on retained prompts: narrow it with a time range or another filter on large ledgers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, and_, exists, select

from zimage_pipeline.audit.chain import AuditEvent, as_utc
from zimage_pipeline.ledger.models import (
    AuditEventRow,
    AuditRequest,
    AuditRequestGroup,
    AuditRequestLabel,
)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    user: str | None = None
    group: str | None = None
    since: datetime | None = None  # inclusive, on the request's first event
    until: datetime | None = None  # exclusive
    status: str | None = None
    reason: str | None = None
    model: str | None = None
    labels: tuple[tuple[str | None, str], ...] = ()  # (key or None for any key, value)
    prompt: str | None = None
    template: str | None = None  # template id
    template_version: int | None = None
    limit: int | None = 100


@dataclass(frozen=True, slots=True)
class RequestSummary:
    request_id: str
    first_at: datetime
    last_at: datetime
    status: str
    reason: str | None
    subject: str | None
    principal: str | None
    model: str | None
    events: int
    prompt_sha256: str | None
    prompt: str | None
    groups: tuple[str, ...] = ()
    labels: dict[str, list[str]] = field(default_factory=dict)
    template_id: str | None = None
    template_version: int | None = None

    @property
    def template(self) -> str | None:
        """`id@vN` (or the id alone where no version was recorded); None for a free prompt."""
        if self.template_id is None:
            return None
        if self.template_version is None:
            return self.template_id
        return f"{self.template_id}@v{self.template_version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "first_at": as_utc(self.first_at).isoformat(),
            "last_at": as_utc(self.last_at).isoformat(),
            "status": self.status,
            "reason": self.reason,
            "user": self.subject,
            "principal": self.principal,
            "model": self.model,
            "events": self.events,
            "groups": list(self.groups),
            "labels": self.labels,
            "prompt_sha256": self.prompt_sha256,
            "prompt": self.prompt,
            "template": (
                None
                if self.template_id is None
                else {"id": self.template_id, "version": self.template_version}
            ),
        }


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def build_query(f: AuditFilter) -> Select[Any]:
    r = AuditRequest
    conditions: list[Any] = []
    if f.user is not None:
        conditions.append(r.subject == f.user)
    if f.status is not None:
        conditions.append(r.status == f.status)
    if f.reason is not None:
        conditions.append(r.reason == f.reason)
    if f.model is not None:
        conditions.append(r.model == f.model)
    if f.template is not None:
        conditions.append(r.template_id == f.template)
    if f.template_version is not None:
        conditions.append(r.template_version == f.template_version)
    if f.since is not None:
        conditions.append(r.first_at >= as_utc(f.since))
    if f.until is not None:
        conditions.append(r.first_at < as_utc(f.until))
    if f.group is not None:
        g = AuditRequestGroup
        conditions.append(
            exists().where(and_(g.request_id == r.request_id, g.group_name == f.group))
        )
    for key, value in f.labels:
        lab = AuditRequestLabel
        match = [lab.request_id == r.request_id, lab.value == value]
        if key is not None:
            match.append(lab.key == key)
        conditions.append(exists().where(and_(*match)))
    if f.prompt:
        conditions.append(r.prompt_text.ilike(f"%{_like_escape(f.prompt)}%", escape="\\"))
    query = select(r).where(*conditions).order_by(r.first_at.desc(), r.request_id.desc())
    if f.limit:
        query = query.limit(f.limit)
    return query


def query_requests(engine: Engine, f: AuditFilter, *, page: int = 1000) -> Iterator[RequestSummary]:
    """Matching requests, newest first, with their groups and labels."""
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=page).execute(build_query(f))
        for chunk in result.partitions(page):
            rows = [row[0] if len(row) == 1 else row for row in chunk]
            yield from _with_children(conn, rows)


def _with_children(conn: Any, rows: Sequence[Any]) -> Iterator[RequestSummary]:
    ids = [row.request_id for row in rows]
    groups: dict[str, list[str]] = {}
    labels: dict[str, dict[str, list[str]]] = {}
    if ids:
        for rid, name in conn.execute(
            select(AuditRequestGroup.request_id, AuditRequestGroup.group_name).where(
                AuditRequestGroup.request_id.in_(ids)
            )
        ):
            groups.setdefault(rid, []).append(name)
        for rid, key, value in conn.execute(
            select(
                AuditRequestLabel.request_id, AuditRequestLabel.key, AuditRequestLabel.value
            ).where(AuditRequestLabel.request_id.in_(ids))
        ):
            labels.setdefault(rid, {}).setdefault(key, []).append(value)
    for row in rows:
        yield RequestSummary(
            request_id=row.request_id,
            first_at=as_utc(row.first_at),
            last_at=as_utc(row.last_at),
            status=row.status,
            reason=row.reason,
            subject=row.subject,
            principal=row.principal,
            model=row.model,
            events=row.events,
            prompt_sha256=row.prompt_sha256,
            prompt=row.prompt_text,
            groups=tuple(sorted(groups.get(row.request_id, []))),
            labels=labels.get(row.request_id, {}),
            template_id=row.template_id,
            template_version=row.template_version,
        )


def row_to_event(row: Any) -> AuditEvent:
    return AuditEvent(
        seq=row.seq,
        at=as_utc(row.at),
        request_id=row.request_id,
        event_type=row.event_type,
        actor=row.actor,
        payload=json.loads(row.payload),
        prev_hash=row.prev_hash,
        event_hash=row.event_hash,
        prompts=json.loads(row.prompt_text) if row.prompt_text else None,
    )


def request_story(
    engine: Engine, request_id: str
) -> tuple[RequestSummary | None, list[AuditEvent]]:
    """The request's index row and every event it has, in chain order."""
    with engine.connect() as conn:
        summary_row = conn.execute(
            select(AuditRequest).where(AuditRequest.request_id == request_id)
        ).one_or_none()
        events = [
            row_to_event(row)
            for row in conn.execute(
                select(AuditEventRow)
                .where(AuditEventRow.request_id == request_id)
                .order_by(AuditEventRow.seq)
            )
        ]
        summary = next(_with_children(conn, [summary_row]), None) if summary_row else None
    return summary, events
