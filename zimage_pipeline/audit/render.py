"""Text renderings for the CLI: tables, JSON lines, CSV, a request's story, a provenance report."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from zimage_pipeline.audit.chain import AuditEvent, format_time

if TYPE_CHECKING:
    from zimage_pipeline.audit.queries import RequestSummary
    from zimage_pipeline.ledger.outbox import DeliveryRow
    from zimage_pipeline.provenance import ProvenanceReport

COLUMNS = ("first_at", "request_id", "user", "status", "reason", "model", "events", "labels")
# The table shows a template column (`id@vN`, after the model) only when a row has one,
# so a ledger without templates reads as before; CSV appends it after the other columns.
TEMPLATE_COLUMNS = (*COLUMNS[:6], "template", *COLUMNS[6:])
MAX_CELL = 40


def _labels(summary: RequestSummary) -> str:
    return ",".join(f"{k}={v}" for k, values in sorted(summary.labels.items()) for v in values)


def _cells(summary: RequestSummary, columns: Sequence[str] = COLUMNS) -> list[str]:
    row = summary.to_dict()
    row["first_at"] = format_time(summary.first_at)[:19] + "Z"
    row["labels"] = _labels(summary)
    row["template"] = summary.template
    return ["" if row[c] is None else str(row[c]) for c in columns]


def render_requests(rows: Iterable[RequestSummary], output: str) -> Iterator[str]:
    if output == "jsonl":
        for summary in rows:
            yield json.dumps(summary.to_dict(), ensure_ascii=False, sort_keys=True)
    elif output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="")
        writer.writerow(
            [
                *COLUMNS,
                *("principal", "groups", "prompt_sha256", "prompt"),
                *("template_id", "template_version"),
            ]
        )
        yield _take(buffer)
        for summary in rows:
            extra = [
                summary.principal or "",
                ";".join(summary.groups),
                summary.prompt_sha256 or "",
                summary.prompt or "",
                summary.template_id or "",
                "" if summary.template_version is None else str(summary.template_version),
            ]
            writer.writerow([_inert(cell) for cell in (*_cells(summary), *extra)])
            yield _take(buffer)
    else:
        summaries = list(rows)
        templated = any(s.template_id is not None for s in summaries)
        columns = TEMPLATE_COLUMNS if templated else COLUMNS
        yield from _table([_cells(s, columns) for s in summaries], columns)


# A cell a spreadsheet would run as a formula (labels and prompts come from clients).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(cell: str) -> str:
    """The cell as text to a spreadsheet: a leading formula character is quoted with
    an apostrophe (OWASP's CSV injection advice); other readers see one extra
    character on such cells only."""
    return f"'{cell}" if cell.startswith(_FORMULA_START) else cell


def _take(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _table(rows: Sequence[list[str]], columns: Sequence[str]) -> Iterator[str]:
    # A table needs every row to size its columns; --format jsonl streams instead.
    clipped = [[c if len(c) <= MAX_CELL else c[: MAX_CELL - 1] + "…" for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in clipped)]) for i, h in enumerate(columns)]
    yield "  ".join(h.ljust(w) for h, w in zip(columns, widths, strict=True)).rstrip()
    for row in clipped:
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
    yield f"({len(rows)} request{'s' if len(rows) != 1 else ''})"


def render_story(
    summary: RequestSummary | None,
    events: Sequence[AuditEvent],
    output: str,
    deliveries: Sequence[DeliveryRow] = (),
) -> Iterator[str]:
    """`deliveries`: the request's result-sink deliveries (webhooks), after its events."""
    if output == "json":
        document = {
            "request": summary.to_dict() if summary else None,
            "events": [_event_dict(e) for e in events],
            "deliveries": [_delivery_dict(d) for d in deliveries],
        }
        yield json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True)
        return
    if summary is not None:
        yield f"request {summary.request_id}: {summary.status}" + (
            f" ({summary.reason})" if summary.reason else ""
        )
        yield f"  user {summary.subject or '-'}  principal {summary.principal or '-'}"
        yield f"  model {summary.model or '-'}  groups {', '.join(summary.groups) or '-'}"
        yield f"  labels {_labels(summary) or '-'}"
        if summary.template is not None:
            yield f"  template {summary.template}"
        if summary.prompt is not None:
            yield f"  prompt {summary.prompt!r}"
        elif summary.prompt_sha256:
            yield f"  prompt sha256 {summary.prompt_sha256} (text not retained)"
    for event in events:
        payload = json.dumps(event.payload, ensure_ascii=False, sort_keys=True)
        yield f"#{event.seq} {format_time(event.at)} {event.event_type:<16} {event.actor}"
        yield f"    {payload}"
        yield f"    hash {event.event_hash[:16]}… prev {event.prev_hash[:16]}…"
    yield from _deliveries(deliveries)


def _deliveries(deliveries: Sequence[DeliveryRow]) -> Iterator[str]:
    if not deliveries:
        return
    yield f"sink deliveries ({len(deliveries)}):"
    for delivery in deliveries:
        when = delivery.finished_at or delivery.next_attempt_at
        label = "at" if delivery.finished_at else "next"
        route = f"  for {delivery.publisher}" if delivery.publisher else ""
        yield (
            f"  {delivery.sink:<12} {delivery.delivery_id}  {delivery.state.value:<9} "
            f"attempts {delivery.attempts}  {label} {format_time(when)}{route}"
        )
        if delivery.last_error:
            yield f"    last error: {delivery.last_error}"


def _delivery_dict(delivery: DeliveryRow) -> dict[str, object]:
    return {
        "sink": delivery.sink,
        "publisher": delivery.publisher,
        "delivery_id": delivery.delivery_id,
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": format_time(delivery.next_attempt_at),
        "created_at": format_time(delivery.created_at),
        "finished_at": format_time(delivery.finished_at) if delivery.finished_at else None,
    }


def _event_dict(event: AuditEvent) -> dict[str, object]:
    return {
        "seq": event.seq,
        "at": format_time(event.at),
        "event_type": event.event_type,
        "actor": event.actor,
        "payload": event.payload,
        "prompts": event.prompts,
        "prev_hash": event.prev_hash,
        "event_hash": event.event_hash,
    }


def render_provenance(report: ProvenanceReport) -> Iterator[str]:
    yield f"format: {report.format or 'unknown'}"
    ai = "yes" if report.marked_as_ai else "NO"
    yield f"marked as AI-generated (IPTC digital source type): {ai}"
    if report.xmp_error:
        yield f"XMP: unreadable: {report.xmp_error}"
    for name, value in sorted(report.xmp.items()):
        yield f"  {name}: {value}"
    c2pa = report.c2pa
    if not c2pa.present:
        yield "C2PA: no manifest"
        return
    verdict = "trusted" if c2pa.trusted else ("verifies" if c2pa.verified else "DOES NOT VERIFY")
    yield f"C2PA: signature {verdict} (state {c2pa.validation_state})"
    yield f"  signer: {c2pa.signer or '-'}"
    yield f"  claim generator: {c2pa.claim_generator or '-'}"
    yield f"  actions: {', '.join(c2pa.actions) or '-'}"
    yield f"  digital source type: {c2pa.digital_source_type or '-'}"
    if c2pa.request:
        yield f"  request: {json.dumps(c2pa.request, sort_keys=True)}"
    for failure in c2pa.failures:
        yield f"  failure: {failure}"
    if c2pa.error:
        yield f"  error: {c2pa.error}"
