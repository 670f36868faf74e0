"""Verify the audit chain, and the anchored heads, naming the first broken event.

What each check catches:
- a gap in `seq`: rows deleted;
- `prev_hash` not equal to the previous row's hash: rows reordered or inserted (or the
  previous row rewritten together with its hash);
- the recomputed hash not equal to `event_hash`: the row was edited;
- a retained prompt whose SHA-256 is not the one in the payload: the prompt was edited;
- the head row not matching the last event: events cut off the end;
- an anchor in the object store not matching the event at its seq, or pointing past the
  end: the database was rewritten (even consistently) or truncated;
- a first event whose hash is not the pinned chain identity (`audit.chain_id`): another
  ledger, or this one rewritten from its first event.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from zimage_pipeline.audit.anchoring import Anchor
from zimage_pipeline.audit.chain import GENESIS_HASH, as_utc, event_hash, sha256_text
from zimage_pipeline.ledger.models import AuditChainHead, AuditEventRow


@dataclass(frozen=True, slots=True)
class BrokenEvent:
    seq: int
    # missing | broken_link | edited | prompt_edited | truncated | anchor_mismatch |
    # foreign_chain
    problem: str
    detail: str
    request_id: str | None = None
    event_type: str | None = None

    def describe(self) -> str:
        who = f" ({self.request_id} {self.event_type})" if self.request_id else ""
        return f"event {self.seq}{who}: {self.problem}: {self.detail}"


@dataclass(slots=True)
class VerifyReport:
    events_checked: int = 0
    last_seq: int = 0
    head_seq: int = 0
    anchors_checked: int = 0
    chain: str | None = None  # the chain's identity: the hash of its first event
    problems: list[BrokenEvent] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_broken(self) -> BrokenEvent | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None


MAX_PROBLEMS = 100  # enough to see the damage; the first is what matters


def verify_chain(
    engine: Engine,
    *,
    anchors: Sequence[Anchor] = (),
    chain_id: str | None = None,
    batch: int = 10_000,
) -> VerifyReport:
    """Check every event, the head, the `anchors` and, with `chain_id`, that the chain
    is the one pinned."""
    report = VerifyReport()
    wanted = {a.seq: a for a in anchors}
    seen: dict[int, str] = {}
    expected_seq, prev = 1, GENESIS_HASH
    columns = (
        AuditEventRow.seq,
        AuditEventRow.at,
        AuditEventRow.request_id,
        AuditEventRow.event_type,
        AuditEventRow.actor,
        AuditEventRow.payload,
        AuditEventRow.prompt_text,
        AuditEventRow.prev_hash,
        AuditEventRow.event_hash,
    )
    with engine.connect() as conn:
        head = conn.execute(select(AuditChainHead.seq, AuditChainHead.event_hash)).one_or_none()
        rows = conn.execution_options(stream_results=True, yield_per=batch).execute(
            select(*columns).order_by(AuditEventRow.seq)
        )
        for row in rows:
            if len(report.problems) >= MAX_PROBLEMS:
                break
            report.events_checked += 1
            report.problems.extend(_check_row(row, expected_seq, prev))
            if row.seq in wanted:
                seen[row.seq] = row.event_hash
            if row.seq == 1:
                report.chain = row.event_hash
            expected_seq, prev = row.seq + 1, row.event_hash
            report.last_seq = row.seq
    _check_head(report, head, prev)
    _check_anchors(report, anchors, seen)
    if chain_id is not None:
        _check_identity(report, chain_id)
    return report


def _check_row(row: Any, expected_seq: int, prev: str) -> list[BrokenEvent]:
    found: list[BrokenEvent] = []

    def broken(problem: str, detail: str) -> None:
        found.append(BrokenEvent(row.seq, problem, detail, row.request_id, row.event_type))

    if row.seq > expected_seq:
        # Named by its number only: a deleted event's request is not known, and naming
        # the next present row's would blame the wrong request.
        gap = f"{expected_seq}" if row.seq == expected_seq + 1 else f"{expected_seq}..{row.seq - 1}"
        detail = (
            f"event(s) {gap} deleted; the next present is {row.seq} "
            f"({row.request_id} {row.event_type})"
        )
        found.append(BrokenEvent(expected_seq, "missing", detail))
    elif row.seq < expected_seq:
        broken("out_of_place", f"seq {row.seq} where {expected_seq} was expected (inserted?)")
    if row.prev_hash != prev:
        broken(
            "broken_link",
            "prev_hash does not match the preceding event: rows reordered or inserted, "
            "or the preceding event rewritten",
        )
    recomputed = event_hash(
        seq=row.seq,
        at=as_utc(row.at),
        request_id=row.request_id,
        event_type=row.event_type,
        actor=row.actor,
        payload_text=row.payload,
        prev_hash=row.prev_hash,
    )
    if recomputed != row.event_hash:
        broken("edited", "content does not match its hash")
    elif row.prompt_text is not None and not _prompts_match(row.payload, row.prompt_text):
        broken("prompt_edited", "retained prompt does not match its hash")
    return found


def _prompts_match(payload_text: str, prompt_text: str) -> bool:
    try:
        payload, prompts = json.loads(payload_text), json.loads(prompt_text)
    except ValueError:
        return False
    return isinstance(prompts, dict) and all(
        payload.get(f"{name}_sha256") == sha256_text(str(text)) for name, text in prompts.items()
    )


def _check_head(report: VerifyReport, head: object, last_hash: str) -> None:
    if head is None:
        report.problems.append(BrokenEvent(0, "truncated", "chain head row missing"))
        return
    head_seq, head_hash = head[0], head[1]  # type: ignore[index]
    report.head_seq = head_seq
    if head_seq != report.last_seq or head_hash != last_hash:
        report.problems.append(
            BrokenEvent(
                report.last_seq + 1 if head_seq > report.last_seq else head_seq,
                "truncated",
                f"chain head says seq {head_seq}, the events end at {report.last_seq}",
            )
        )


def _check_anchors(report: VerifyReport, anchors: Sequence[Anchor], seen: dict[int, str]) -> None:
    for anchor in anchors:
        report.anchors_checked += 1
        if anchor.seq > report.last_seq:
            report.problems.append(
                BrokenEvent(
                    anchor.seq,
                    "truncated",
                    f"anchored at {anchor.key} but the events end at {report.last_seq}",
                )
            )
        elif seen.get(anchor.seq) != anchor.event_hash:
            report.problems.append(BrokenEvent(anchor.seq, "anchor_mismatch", _mismatch(anchor)))


def _mismatch(anchor: Anchor) -> str:
    detail = f"differs from the hash anchored at {anchor.key}: the database was rewritten"
    if anchor.legacy:
        # Keyed by position only: where several ledgers shared the prefix before anchors
        # had a chain identity, this may be another ledger's.
        detail += (
            " (a legacy anchor, keyed by position only: if another ledger wrote it before "
            "anchors were keyed by chain, check with --no-legacy-anchors)"
        )
    return detail


def _check_identity(report: VerifyReport, chain_id: str) -> None:
    if report.chain == chain_id:
        return
    found = f"is {report.chain}" if report.chain else "has no event 1"
    report.problems.append(
        BrokenEvent(
            1,
            "foreign_chain",
            f"audit.chain_id pins chain {chain_id}, this ledger's chain {found}: another "
            "ledger, or this one rewritten from its first event",
        )
    )
