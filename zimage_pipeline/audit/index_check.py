"""`audit verify` of the query index: every row agrees with what the events say.

The index (audit/index.py) is derived data that `audit query` and `audit show` read, so
an edit to it would change what a compliance officer sees without touching the hash
chain. Here each request's events are folded again, with the index's own rules
(`index.fold_events`), and compared with its row, its groups and its labels. Events are read
one request at a time (ordered by request, then seq), so memory holds one request's
events plus the index rows, never the whole trail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any

from sqlalchemy import Engine, select

from zimage_pipeline.audit.chain import as_utc
from zimage_pipeline.audit.index import fold_events
from zimage_pipeline.ledger.models import (
    AuditEventRow,
    AuditRequest,
    AuditRequestGroup,
    AuditRequestLabel,
)

COLUMNS = (
    "subject",
    "principal",
    "model",
    "status",
    "reason",
    "first_at",
    "last_at",
    "events",
    "prompt_sha256",
    "prompt_text",
    "template_id",
    "template_version",
)
MAX_PROBLEMS = 100


@dataclass(frozen=True, slots=True)
class _Event:
    request_id: str
    at: datetime
    event_type: str
    payload: dict[str, Any]
    prompts: dict[str, str] | None


def check_index(engine: Engine, *, batch: int = 10_000) -> list[str]:
    """What in the index disagrees with the events, as sentences naming the request
    and the column (empty: the index is what the events say)."""
    problems: list[str] = []
    with engine.connect() as conn:
        rows = {row.request_id: row for row in conn.execute(select(AuditRequest))}
        groups: dict[str, set[str]] = {}
        for g in conn.execute(select(AuditRequestGroup)):
            groups.setdefault(g.request_id, set()).add(g.group_name)
        labels: dict[str, set[tuple[str, str]]] = {}
        for label in conn.execute(select(AuditRequestLabel)):
            labels.setdefault(label.request_id, set()).add((label.key, label.value))
        events = conn.execution_options(stream_results=True, yield_per=batch).execute(
            select(
                AuditEventRow.request_id,
                AuditEventRow.at,
                AuditEventRow.event_type,
                AuditEventRow.payload,
                AuditEventRow.prompt_text,
            ).order_by(AuditEventRow.request_id, AuditEventRow.seq)
        )
        for request_id, grouped in groupby(_decoded(events), key=lambda e: e.request_id):
            if len(problems) >= MAX_PROBLEMS:
                return problems
            request_events = list(grouped)
            row = rows.pop(request_id, None)
            if row is None:
                problems.append(f"index: request {request_id}: no row (its events say it ran)")
                continue
            problems.extend(_row_problems(request_id, row, request_events))
            problems.extend(
                _set_problems(request_id, request_events, groups.pop(request_id, set()), labels)
            )
    for request_id in sorted(rows)[: max(0, MAX_PROBLEMS - len(problems))]:
        problems.append(f"index: request {request_id}: a row without any event")
    return problems


def _decoded(rows: Any) -> Iterator[_Event]:
    for row in rows:
        try:
            payload = json.loads(row.payload)
            prompts = json.loads(row.prompt_text) if row.prompt_text else None
        except ValueError:
            # An unreadable payload is the chain's to report (its hash no longer holds).
            payload, prompts = {}, None
        yield _Event(
            row.request_id,
            row.at,
            row.event_type,
            payload if isinstance(payload, dict) else {},
            prompts if isinstance(prompts, dict) else None,
        )


def _row_problems(request_id: str, row: Any, events: list[_Event]) -> list[str]:
    expected: dict[str, Any] = {
        **dict.fromkeys(COLUMNS),
        "first_at": events[0].at,
        "events": len(events),
        **fold_events(None, events),
    }
    problems = []
    for column in COLUMNS:
        have, want = getattr(row, column), expected[column]
        if isinstance(have, datetime) and isinstance(want, datetime):
            have, want = as_utc(have), as_utc(want)
        if have != want:
            problems.append(
                f"index: request {request_id}: {column} is {have!r}, the events say {want!r}"
            )
    return problems


def _set_problems(
    request_id: str,
    events: list[_Event],
    groups: set[str],
    labels: dict[str, set[tuple[str, str]]],
) -> list[str]:
    problems = []
    want_groups = {str(g)[:512] for e in events for g in e.payload.get("groups") or ()}
    if groups != want_groups:
        problems.append(
            f"index: request {request_id}: groups are {sorted(groups)}, "
            f"the events say {sorted(want_groups)}"
        )
    # The index keeps every (key, value) an append saw; the last value of each key
    # must be there, and nothing the events never carried.
    seen: set[tuple[str, str]] = set()
    last: dict[str, str] = {}
    for event in events:
        if isinstance(event.payload.get("labels"), dict):
            for key, value in event.payload["labels"].items():
                pair = (str(key)[:64], str(value)[:256])
                seen.add(pair)
                last[pair[0]] = pair[1]
    have = labels.pop(request_id, set())
    missing = set(last.items()) - have
    forged = have - seen
    if missing or forged:
        problems.append(
            f"index: request {request_id}: labels missing {sorted(missing)}, "
            f"not in any event {sorted(forged)}"
        )
    return problems
