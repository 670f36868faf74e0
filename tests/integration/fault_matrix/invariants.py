"""The invariant checker of the fault matrix: after any fault, the system's books balance.

What it proves, over one test's ledger (a database of its own), its object prefix and
the results it saw published:

1. every request has exactly one terminal outcome: its job row is terminal, and every
   result published for it equals the result the ledger stored (a republish after a
   crash is the same answer, never a second, different one);
2. charges equal stored images: a succeeded request has one committed reservation and
   one commit entry of exactly its images, every other request has none; every quota
   counter's `used` is the sum of the commits it covers;
3. no reservation is left open (`reserved`, or `expired` by a lease running out);
4. objects, ledger and audit match one to one: the keys under the prefix are exactly the
   keys the succeeded results name (images, their renditions and audit records, same
   SHA-256, same request), and each such request's `stored` audit events name exactly
   those keys;
5. the audit chain verifies (the project's own verifier, anchors included);
6. the broker side (when observed, `World.broker`): every request message a client
   published got exactly one result (a duplicate message is answered too, by a
   republish; `extra_results` allows for the crash cases, where a worker killed between
   its confirmed publish and its ack answers the redelivery again), every copy a worker
   republished through a delay queue came back exactly once and after the delay it asked
   for, and no message is left in a delay or request queue at the end.

`find_problems` is a pure function of a `World` snapshot, so it is unit-tested against
deliberately broken states; `collect` reads the snapshot from the real services.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from zimage_pipeline.ids import scoped_key
from zimage_pipeline.junk_audit import SUMMARY_EVENT, UNIDENTIFIED_PREFIX
from zimage_pipeline.ledger.models import (
    AuditEventRow,
    Job,
    QuotaCounter,
    QuotaEntry,
    QuotaReservation,
)
from zimage_pipeline.messages import GenerationResult
from zimage_pipeline.wiring.jobs import TOMBSTONE

TERMINAL = frozenset({"succeeded", "failed", "rejected", "cancelled", "expired"})
# Answered without a request id (no job row of theirs): the body is not a request, has
# no publisher, or reuses an id that holds another request.
PRE_LEDGER_REASONS = frozenset(
    {"INVALID_REQUEST", "UNAUTHENTICATED_PUBLISHER", "REQUEST_ID_CONFLICT"}
)
# The audit event a request that did not succeed ends with (service._finish_unsuccessful).
ENDING_EVENT = {
    "rejected": "denied",
    "failed": "failed",
    "cancelled": "cancelled",
    "expired": "expired",
}


@dataclass(frozen=True, slots=True)
class JobRow:
    request_id: str
    status: str
    reason: str | None
    result: Mapping[str, Any] | None
    principal: str = ""  # the publisher whose request it is


@dataclass(frozen=True, slots=True)
class ReservationRow:
    request_id: str
    subjects: tuple[str, ...]
    day: str
    month: str
    images: int
    committed: int | None
    state: str


@dataclass(frozen=True, slots=True)
class EntryRow:
    request_id: str
    kind: str
    images: int


@dataclass(frozen=True, slots=True)
class CounterRow:
    subject: str
    window: str
    period: str
    used: int
    reserved: int


@dataclass(frozen=True, slots=True)
class EventRow:
    seq: int
    request_id: str
    event_type: str
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    sha256: str | None  # the digest the store kept in our metadata
    size: int
    request_id: str | None  # our `request-id` metadata


@dataclass(frozen=True, slots=True)
class Sighting:
    """A message seen on the requests exchange: a client's original (no copy id), or a
    worker's copy returning from its delay queue."""

    request_id: str | None  # from the body, when it is readable
    copy_id: str | None = None
    delay_s: float | None = None  # the delay the copy asked for
    republished_at_ms: int | None = None
    arrived_at_ms: int | None = None


@dataclass(slots=True)
class BrokerView:
    sightings: list[Sighting] = field(default_factory=list)
    leftover: dict[str, int] = field(default_factory=dict)  # queue -> messages still in it
    # When the case stopped the broker (epoch ms, start and end): a copy whose delay ran
    # out meanwhile comes back when the broker does, not before.
    outages: list[tuple[int, int]] = field(default_factory=list)
    # A copy that expires while its target queue is still recovering from an outage is
    # kept by the broker's at-least-once dead-lettering and sent again after this long
    # (RabbitMQ's dead_letter_worker_publisher_confirm_timeout); 0 when no case set it.
    dead_letter_resend_s: float = 0.0


# A copy may come back this much earlier than asked (clocks of one host, ms rounding)...
DELAY_EARLY_S = 0.25
# ...or this much later (a quorum queue dead-letters at its head; a loaded CI host).
DELAY_LATE_S = 3.0
# How long after an outage's end the broker's quorum queues may still be electing leaders.
RECOVERY_S = 15.0


@dataclass(slots=True)
class World:
    jobs: dict[str, JobRow] = field(default_factory=dict)
    reservations: dict[str, ReservationRow] = field(default_factory=dict)
    entries: list[EntryRow] = field(default_factory=list)
    counters: list[CounterRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    results: list[Mapping[str, Any]] = field(default_factory=list)  # every one published
    # The publisher each result was routed to (result.<publisher>.…), when observed.
    result_publishers: list[str | None] = field(default_factory=list)
    chain_problems: list[str] = field(default_factory=list)  # from audit.verify_chain
    broker: BrokerView | None = None  # None: the broker side was not observed


def normalized(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result as the contract defines it (the published JSON leaves out nulls, the
    ledger keeps them): parse, then dump the same way."""
    parsed = GenerationResult.model_validate(result)
    # The echo of each answered message's correlation id differs per message, by design.
    return parsed.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"correlation_id"}
    )


def result_digests(result: Mapping[str, Any]) -> dict[str, str]:
    """Each image's and each of its renditions' key, with the digest the result gives."""
    digests: dict[str, str] = {}
    for image in result.get("images") or []:
        digests[str(image["key"])] = str(image["sha256"])
        for rendition in image.get("renditions") or []:
            digests[str(rendition["key"])] = str(rendition["sha256"])
    return digests


def result_keys(result: Mapping[str, Any]) -> set[str]:
    keys = set(result_digests(result))
    if result.get("audit_record_key"):
        keys.add(str(result["audit_record_key"]))
    return keys


def stored_keys(payload: Mapping[str, Any]) -> set[str]:
    keys = {str(o["key"]) for o in payload.get("objects") or []}
    keys |= {str(r["key"]) for r in payload.get("renditions") or []}
    if payload.get("audit_record_key"):
        keys.add(str(payload["audit_record_key"]))
    return keys


def find_problems(
    world: World, *, expected: Collection[str] = (), extra_results: int = 0
) -> list[str]:
    """Every broken invariant, in words; empty when the books balance."""
    problems: list[str] = []
    problems += _outcomes(world, expected)
    if world.broker is not None:
        problems += _broker(world.broker, world.results, extra_results)
    problems += _charges(world)
    problems += _objects(world)
    problems += _audit(world)
    problems += [f"audit chain: {p}" for p in world.chain_problems]
    return problems


def _outcomes(world: World, expected: Collection[str]) -> list[str]:
    problems: list[str] = []
    # Each result under the ledger's key of its request: a publisher's request under an
    # id another publisher holds is keyed apart (ids.scoped_key), answered under the id.
    published: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    publishers = world.result_publishers or [None] * len(world.results)
    for result, publisher in zip(world.results, publishers, strict=True):
        key = ledger_key_of(world, str(result.get("request_id") or ""), publisher)
        published[key].append({**result, "request_id": key} if key else result)
    for rid in sorted(expected):
        if rid not in world.jobs:
            problems.append(f"{rid}: no job row (no outcome at all)")
        if not published.get(rid):
            problems.append(f"{rid}: no result was published")
    for rid, job in sorted(world.jobs.items()):
        if job.status not in TERMINAL:
            problems.append(f"{rid}: job is {job.status!r}, not terminal")
            continue
        if job.result is None:
            problems.append(f"{rid}: terminal job {job.status!r} stores no result")
            continue
        stored = normalized(job.result)
        if (stored["status"], stored.get("reason")) != (job.status, job.reason):
            problems.append(f"{rid}: job row says {job.status}/{job.reason}, its result {stored}")
        for answer in published.get(rid, []):
            if normalized(answer) != stored:
                problems.append(
                    f"{rid}: a published result differs from the ledger's: "
                    f"{normalized(answer)} != {stored}"
                )
    for rid, answers in sorted(published.items()):
        if rid in world.jobs:
            continue
        for answer in answers:
            if answer.get("status") != "rejected" or answer.get("reason") not in PRE_LEDGER_REASONS:
                problems.append(
                    f"{rid or '(no id)'}: result {answer.get('status')}/{answer.get('reason')} "
                    "published for a request the ledger never saw"
                )
    return problems


def ledger_key_of(world: World, request_id: str, publisher: str | None) -> str:
    job = world.jobs.get(request_id)
    if request_id and publisher and job is not None and job.principal != publisher:
        scoped = scoped_key(request_id, publisher)
        if scoped in world.jobs:
            return scoped
    return request_id


def _held_by_outage_s(
    outages: Sequence[tuple[int, int]], sent_ms: int, due_ms: int, resend_s: float = 0.0
) -> float:
    """How long an outage of the broker that began before a copy was due kept it back.

    With a dead-letter resend interval, a copy due before the queues had recovered may
    also wait for the broker's next resend after that recovery."""
    held = [end - due_ms for start, end in outages if start <= due_ms and end >= sent_ms]
    if resend_s:
        recovery_ms, resend_ms = int(RECOVERY_S * 1000), int(resend_s * 1000)
        held += [
            end + recovery_ms + resend_ms - due_ms
            for start, end in outages
            if start <= due_ms <= end + recovery_ms
        ]
    return max([0, *held]) / 1000


def _broker(
    broker: BrokerView, results: Sequence[Mapping[str, Any]], extra_results: int
) -> list[str]:
    problems: list[str] = []
    originals = [s for s in broker.sightings if s.copy_id is None]
    sent = Counter(s.request_id or "" for s in originals)
    answered = Counter(str(r.get("request_id") or "") for r in results)
    if not 0 <= len(results) - len(originals) <= extra_results:
        problems.append(
            f"{len(results)} result(s) published for {len(originals)} request message(s)"
            + (f" (up to {extra_results} more allowed)" if extra_results else "")
        )
    for rid, count in sorted(answered.items()):
        if rid and count > sent[rid] + extra_results:
            problems.append(f"{rid}: {count} results for {sent[rid]} message(s)")
    copies = Counter(s.copy_id for s in broker.sightings if s.copy_id is not None)
    for copy_id, count in sorted(copies.items()):
        if count > 1:
            problems.append(f"copy {copy_id} came back {count} times from the delay queues")
    for s in broker.sightings:
        if s.copy_id is None or None in (s.delay_s, s.republished_at_ms, s.arrived_at_ms):
            continue
        assert s.delay_s is not None and s.republished_at_ms is not None
        assert s.arrived_at_ms is not None
        took_s = (s.arrived_at_ms - s.republished_at_ms) / 1000
        due_ms = s.republished_at_ms + int(s.delay_s * 1000)
        late_s = DELAY_LATE_S + _held_by_outage_s(
            broker.outages, s.republished_at_ms, due_ms, broker.dead_letter_resend_s
        )
        if not s.delay_s - DELAY_EARLY_S <= took_s <= s.delay_s + late_s:
            problems.append(
                f"{s.request_id}: copy {s.copy_id} asked for {s.delay_s:g} s and came back "
                f"after {took_s:.2f} s"
            )
    for queue, count in sorted(broker.leftover.items()):
        if count:
            problems.append(f"{queue}: {count} message(s) left at the end")
    return problems


def _charges(world: World) -> list[str]:
    problems: list[str] = []
    commits = Counter(e.request_id for e in world.entries if e.kind == "commit")
    commit_images = {e.request_id: e.images for e in world.entries if e.kind == "commit"}
    for rid, count in commits.items():
        if count > 1:
            problems.append(f"{rid}: charged {count} times (commit entries)")
    for rid, job in sorted(world.jobs.items()):
        reservation = world.reservations.get(rid)
        if job.status == "succeeded":
            images = len((job.result or {}).get("images") or [])
            if reservation is None or reservation.state != "committed":
                state = reservation.state if reservation else "missing"
                problems.append(f"{rid}: succeeded but its reservation is {state}")
            elif reservation.committed != images:
                problems.append(f"{rid}: {images} image(s) stored, {reservation.committed} charged")
            if commit_images.get(rid) != images:
                problems.append(
                    f"{rid}: commit entry of {commit_images.get(rid)} for {images} image(s)"
                )
        else:
            if reservation is not None and reservation.state == "committed":
                problems.append(f"{rid}: {job.status} but charged {reservation.committed}")
            if rid in commits:
                problems.append(f"{rid}: {job.status} but has a commit entry")
    for rid, reservation in sorted(world.reservations.items()):
        if rid not in world.jobs:
            problems.append(f"{rid}: reservation without a job row")
        if reservation.state in ("reserved", "expired"):
            problems.append(f"{rid}: reservation left {reservation.state} (open)")
    # Every counter equals the sum of what its reservations committed and still hold.
    want_used: Counter[tuple[str, str, str]] = Counter()
    want_reserved: Counter[tuple[str, str, str]] = Counter()
    for reservation in world.reservations.values():
        for subject in reservation.subjects:
            for cell in ((subject, "day", reservation.day), (subject, "month", reservation.month)):
                if reservation.state == "committed":
                    want_used[cell] += reservation.committed or 0
                elif reservation.state == "reserved":
                    want_reserved[cell] += reservation.images
    seen: set[tuple[str, str, str]] = set()
    for row in world.counters:
        cell = (row.subject, row.window, row.period)
        seen.add(cell)
        if (row.used, row.reserved) != (want_used[cell], want_reserved[cell]):
            problems.append(
                f"counter {cell}: used {row.used}, reserved {row.reserved}; the reservations "
                f"account for used {want_used[cell]}, reserved {want_reserved[cell]}"
            )
    for cell in sorted(set(want_used) - seen):
        if want_used[cell]:
            problems.append(f"counter {cell}: missing, the commits add up to {want_used[cell]}")
    return problems


def _objects(world: World) -> list[str]:
    problems: list[str] = []
    owner: dict[str, str] = {}
    digests: dict[str, str] = {}
    for rid, job in sorted(world.jobs.items()):
        if job.status != "succeeded" or job.result is None:
            continue
        for key in result_keys(job.result):
            if key in owner:
                problems.append(f"{key}: named by both {owner[key]} and {rid}")
            owner[key] = rid
        digests.update(result_digests(job.result))
    for key in sorted(set(world.objects) - set(owner)):
        problems.append(f"{key}: orphan object (no succeeded request names it)")
    for key in sorted(set(owner) - set(world.objects)):
        problems.append(f"{key}: named by {owner[key]}'s result but not in the store")
    for key, info in sorted(world.objects.items()):
        if key not in owner:
            continue
        if info.request_id != owner[key]:
            problems.append(f"{key}: stored for {info.request_id!r}, named by {owner[key]!r}")
        if key in digests and info.sha256 != digests[key]:
            problems.append(f"{key}: store has sha256 {info.sha256}, result says {digests[key]}")
    return problems


def _audit(world: World) -> list[str]:
    problems: list[str] = []
    by_request: dict[str, list[EventRow]] = defaultdict(list)
    for event in world.events:
        by_request[event.request_id].append(event)
    for rid in sorted(set(by_request) - set(world.jobs)):
        # A message rejected before the ledger (not a valid request) leaves only the
        # record that its rejection was published, or, answered without any id, its
        # `denied` event under `unidentified-<digest>`; anything more is a trail without
        # a job.
        trail = {(e.event_type, str(e.payload.get("status"))) for e in by_request[rid]}
        # A junk window's summary has its own trail of `denied_summary` events.
        allowed = (
            ({("denied", "None")}, {(SUMMARY_EVENT, "None")})
            if rid.startswith(UNIDENTIFIED_PREFIX)
            else ({("published", "rejected")},)
        )
        if trail not in allowed:
            problems.append(f"{rid}: audit events {sorted(trail)} without a job row")
    for rid, job in sorted(world.jobs.items()):
        events = by_request.get(rid, [])
        kinds = Counter(e.event_type for e in events)
        stored = [e for e in events if e.event_type == "stored"]
        committed = [e for e in events if e.event_type == "quota_committed"]
        if job.status == "succeeded":
            keys = result_keys(job.result or {})
            images = len((job.result or {}).get("images") or [])
            if not stored:
                problems.append(f"{rid}: succeeded without a 'stored' audit event")
            for event in stored:
                if stored_keys(event.payload) != keys:
                    problems.append(
                        f"{rid}: 'stored' event #{event.seq} names "
                        f"{sorted(stored_keys(event.payload))}, the result {sorted(keys)}"
                    )
            if not committed:
                problems.append(f"{rid}: succeeded without a 'quota_committed' audit event")
            for event in committed:
                if event.payload.get("images") != images:
                    problems.append(
                        f"{rid}: 'quota_committed' event #{event.seq} says "
                        f"{event.payload.get('images')}, {images} stored"
                    )
        else:
            if stored or committed:
                problems.append(f"{rid}: {job.status} but audited as stored/committed")
            ending = ENDING_EVENT.get(job.status)
            if ending is not None and not kinds[ending]:
                problems.append(f"{rid}: {job.status} without a {ending!r} audit event")
        for event in events:
            if event.event_type == "published" and event.payload.get("status") != job.status:
                problems.append(
                    f"{rid}: 'published' event #{event.seq} says {event.payload.get('status')}, "
                    f"the job {job.status}"
                )
    return problems


# -- reading the real services -------------------------------------------------------------


def read_ledger(engine: Engine) -> World:
    """Jobs, quota and audit rows of a whole (test-private) ledger database."""
    world = World()
    with engine.connect() as conn:
        # A cancel's row for a request that never came is not a request (wiring/jobs.py).
        jobs = select(Job.request_id, Job.status, Job.reason, Job.result, Job.principal).where(
            Job.payload_sha256 != TOMBSTONE
        )
        for row in conn.execute(jobs):
            world.jobs[row.request_id] = JobRow(
                row.request_id, row.status, row.reason, row.result, row.principal
            )
        reservations = select(
            QuotaReservation.request_id,
            QuotaReservation.subjects,
            QuotaReservation.day,
            QuotaReservation.month,
            QuotaReservation.images,
            QuotaReservation.committed,
            QuotaReservation.state,
        )
        for r in conn.execute(reservations):
            world.reservations[r.request_id] = ReservationRow(
                r.request_id, tuple(r.subjects), r.day, r.month, r.images, r.committed, r.state
            )
        for e in conn.execute(select(QuotaEntry.request_id, QuotaEntry.kind, QuotaEntry.images)):
            if e.kind in ("reserve", "commit", "release"):
                world.entries.append(EntryRow(e.request_id, e.kind, e.images))
        counters = select(
            QuotaCounter.subject,
            QuotaCounter.window_kind,
            QuotaCounter.period,
            QuotaCounter.used,
            QuotaCounter.reserved,
        )
        for c in conn.execute(counters):
            world.counters.append(
                CounterRow(c.subject, c.window_kind, c.period, c.used, c.reserved)
            )
        for a in conn.execute(
            select(
                AuditEventRow.seq,
                AuditEventRow.request_id,
                AuditEventRow.event_type,
                AuditEventRow.payload,
            ).order_by(AuditEventRow.seq)
        ):
            world.events.append(EventRow(a.seq, a.request_id, a.event_type, json.loads(a.payload)))
    return world


def format_problems(problems: Sequence[str], *, limit: int = 40) -> str:
    shown = list(problems[:limit])
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    return "invariants broken:\n  " + "\n  ".join(shown)


def merge_results(*streams: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for stream in streams for r in stream]
