"""`zimage-pipeline audit ...` and `zimage-pipeline provenance show`.

Exit codes: 0 fine; 1 the audit chain, an image's provenance or a bundle does not
verify; 2 configuration error; 4 nothing found.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zimage_pipeline.errors import EXIT_CONFIG, ConfigError, ZImageError
from zimage_pipeline.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from zimage_pipeline.audit import AnchorSurvey, ChainAnchorer

EXIT_BROKEN = 1
EXIT_NOT_FOUND = 4

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
FromOption = Annotated[
    str | None,
    typer.Option("--from", "--since", help="Start (inclusive), ISO 8601; no zone means UTC."),
]
ToOption = Annotated[str | None, typer.Option("--to", "--until", help="End (exclusive), ISO 8601.")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _engine(settings: Settings) -> Engine:
    from zimage_pipeline.ledger.db import create_ledger_engine

    return create_ledger_engine(settings.database)


def _anchorer(settings: Settings, engine: Engine) -> ChainAnchorer:
    from zimage_pipeline.audit import ChainAnchorer
    from zimage_pipeline.storage import ObjectStore

    store = ObjectStore(settings.storage)
    return ChainAnchorer(engine, store, storage=settings.storage, audit=settings.audit)


def parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint=option) from None
    try:
        # In UTC here: an offset near the ends of the calendar cannot be (OverflowError).
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:
        raise typer.BadParameter(f"out of range: {value!r}", param_hint=option) from None


def _fail(exc: ZImageError) -> typer.Exit:
    typer.echo(f"error: {exc} ({exc.reason})", err=True)
    return typer.Exit(EXIT_BROKEN)


def query(
    user: Annotated[str | None, typer.Option(help="Who was served (on_behalf_of).")] = None,
    group: Annotated[str | None, typer.Option(help="A group of the user at the time.")] = None,
    since: FromOption = None,
    until: ToOption = None,
    status: Annotated[
        str | None, typer.Option(help="received ... published, failed, denied.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Reason code, e.g. QUOTA_EXCEEDED.")] = None,
    model: Annotated[str | None, typer.Option(help="Model identity.")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE or VALUE (any key); repeatable.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Substring of a retained prompt.")] = None,
    template: Annotated[
        str | None, typer.Option(help="Template id: the requests made from that template.")
    ] = None,
    template_version: Annotated[
        int | None,
        typer.Option(min=1, max=2**31 - 1, help="With --template: only that version of it."),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, max=10**9, help="Most rows; 0 for all.")] = 100,
    output: Annotated[str, typer.Option("--format", help="table | jsonl | csv")] = "table",
    config: ConfigOption = None,
) -> None:
    """Requests matching every filter given, newest first."""
    from zimage_pipeline.audit import AuditFilter, query_requests
    from zimage_pipeline.audit.index import STATUSES
    from zimage_pipeline.audit.render import render_requests

    if output not in ("table", "jsonl", "csv"):
        raise typer.BadParameter("table, jsonl or csv", param_hint="--format")
    if status is not None and status not in STATUSES:
        raise typer.BadParameter(f"one of {', '.join(sorted(STATUSES))}", param_hint="--status")
    start, end = parse_time(since, "--from"), parse_time(until, "--to")
    if start is not None and end is not None and start >= end:
        raise typer.BadParameter(f"{since!r} is not before --to {until!r}", param_hint="--from")
    if template_version is not None and template is None:
        raise typer.BadParameter("needs --template ID", param_hint="--template-version")
    labels = tuple(
        (k, v) if sep else (None, k) for k, sep, v in (item.partition("=") for item in label or [])
    )
    audit_filter = AuditFilter(
        user=user,
        group=group,
        since=start,
        until=end,
        status=status,
        reason=reason,
        model=model,
        labels=labels,
        prompt=prompt,
        template=template,
        template_version=template_version,
        limit=limit or None,
    )
    engine = _engine(_settings(config))
    try:
        for line in render_requests(query_requests(engine, audit_filter), output):
            typer.echo(line)
    finally:
        engine.dispose()


def show(
    request_id: str,
    output: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    publisher: Annotated[
        str | None,
        typer.Option(
            help="The AMQP account that published the request: request ids are per "
            "publisher, and a second publisher's request under an id is kept apart."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """One request's whole story: its index row and every event, in chain order, then
    its result-sink deliveries (webhooks: state, attempts, last error)."""
    from zimage_pipeline.audit import request_story
    from zimage_pipeline.audit.render import render_story
    from zimage_pipeline.ledger.outbox import SinkOutbox

    if output not in ("text", "json"):
        raise typer.BadParameter("text or json", param_hint="--format")

    engine = _engine(_settings(config))
    try:
        if publisher is not None:
            request_id = _ledger_key(engine, request_id, publisher)
        summary, events = request_story(engine, request_id)
        deliveries = SinkOutbox(engine).deliveries(request_id)
    finally:
        engine.dispose()
    if summary is None and not events and not deliveries:
        typer.echo(f"no audit events for {request_id}", err=True)
        raise typer.Exit(EXIT_NOT_FOUND)
    for line in render_story(summary, events, output, deliveries):
        typer.echo(line)


def _ledger_key(engine: Engine, request_id: str, publisher: str) -> str:
    """The key the ledger keeps `publisher`'s request `request_id` under (ids.scoped_key
    when another publisher used the id first)."""
    from zimage_pipeline.ids import scoped_key
    from zimage_pipeline.ledger.jobs import JobStore

    job = JobStore(engine).get(request_id)
    if job is None or job.principal == publisher:
        return request_id
    return scoped_key(request_id, publisher)


def verify(
    anchors: Annotated[bool, typer.Option(help="Also check the heads anchored in S3.")] = True,
    legacy_anchors: Annotated[
        bool,
        typer.Option(
            help="Also check anchors keyed by position only (written before anchors had a "
            "chain identity); --no-legacy-anchors where several ledgers wrote them."
        ),
    ] = True,
    index: Annotated[
        bool,
        typer.Option(
            help="Also check the query index (what `query` and `show` read) against the events."
        ),
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Check the hash chain (and the anchors, and the query index); name the first broken
    event, exit 1."""
    from zimage_pipeline.audit import verify_chain
    from zimage_pipeline.audit.index_check import check_index

    settings = _settings(config)
    engine = _engine(settings)
    try:
        survey = _anchorer(settings, engine).survey(legacy=legacy_anchors) if anchors else None
        report = verify_chain(
            engine,
            anchors=survey.anchors if survey else (),
            chain_id=settings.audit.chain_id,
        )
        index_problems = check_index(engine) if index else []
    except ZImageError as exc:
        raise _fail(exc) from None
    finally:
        engine.dispose()
    typer.echo(
        f"checked {report.events_checked} events (head {report.head_seq}), "
        f"{report.anchors_checked} anchors"
    )
    typer.echo(f"chain {report.chain or '(no event 1)'}")
    if survey is not None:
        _echo_survey(survey)
    first = report.first_broken
    if first is None and not index_problems:
        typer.echo("OK: audit chain intact" + (", query index agrees" if index else ""))
        return
    if first is not None:
        typer.echo(f"BROKEN: first broken event: {first.describe()}")
        for problem in sorted(report.problems, key=lambda p: p.seq)[1:10]:
            typer.echo(f"  also: {problem.describe()}")
    if index_problems:
        typer.echo(f"BROKEN: the query index disagrees with the events: {index_problems[0]}")
        for disagreement in index_problems[1:10]:
            typer.echo(f"  also: {disagreement}")
    raise typer.Exit(EXIT_BROKEN)


def _echo_survey(survey: AnchorSurvey) -> None:
    """What else stands under the prefix: expected where ledgers share it, and worth a
    look where one ledger should be alone (a ledger rewritten from its first event
    leaves its old chain's anchors behind)."""
    if survey.legacy_skipped:
        typer.echo(
            f"note: {survey.legacy_skipped} legacy anchors of other ledgers skipped "
            "(older than this chain's first event)"
        )
    if survey.other_chains:
        shown = ", ".join(survey.other_chains[:5])
        more = f" and {len(survey.other_chains) - 5} more" if len(survey.other_chains) > 5 else ""
        typer.echo(
            f"note: anchors of {len(survey.other_chains)} other chain(s) under this prefix: "
            f"{shown}{more} (other ledgers sharing it; pin this one with audit.chain_id)"
        )


def export(
    directory: Path,
    since: Annotated[str, typer.Option("--from", help="Start (inclusive), ISO 8601.")],
    until: Annotated[str, typer.Option("--to", help="End (exclusive), ISO 8601.")],
    signed_off_by: Annotated[
        str | None, typer.Option(help="Name recorded in the manifest.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write a self-verifying bundle of the events in [--from, --to) into DIRECTORY."""
    from zimage_pipeline.audit import export_bundle

    settings = _settings(config)
    start, end = parse_time(since, "--from"), parse_time(until, "--to")
    assert start is not None and end is not None
    engine = _engine(settings)
    try:
        manifest = export_bundle(
            engine,
            directory,
            since=start,
            until=end,
            anchors=_anchorer(settings, engine).anchors(),
            signed_off_by=signed_off_by,
            signing_key_file=settings.audit.export_signing_key_file,
            chain_id=settings.audit.chain_id,
        )
    except ZImageError as exc:
        raise _fail(exc) from None
    finally:
        engine.dispose()
    events = manifest["events"]
    typer.echo(
        f"exported {events['count']} events (seq {events['first_seq']}..{events['last_seq']}) "
        f"to {directory}; chain verified: {manifest['chain_verified']}"
    )
    if manifest["ledger_problem"]:
        typer.echo(f"BROKEN: {manifest['ledger_problem']} (audit verify says more)", err=True)
    if not manifest["chain_verified"]:
        raise typer.Exit(EXIT_BROKEN)


def anchor(config: ConfigOption = None) -> None:
    """Write the current chain head to the audit bucket now."""
    settings = _settings(config)
    engine = _engine(settings)
    try:
        written = _anchorer(settings, engine).anchor()
    except ZImageError as exc:
        raise _fail(exc) from None
    finally:
        engine.dispose()
    typer.echo(f"anchored seq {written.seq} at {written.key}" if written else "nothing to anchor")


def redact(config: ConfigOption = None) -> None:
    """Apply the prompt retention policy now (also safe to run from cron)."""
    from zimage_pipeline.audit import apply_prompt_retention

    settings = _settings(config)
    engine = _engine(settings)
    try:
        cleared = apply_prompt_retention(engine, settings.audit)
    finally:
        engine.dispose()
    typer.echo(f"prompt retention '{settings.audit.prompt_retention}': {cleared} events cleared")


def provenance_show(
    file: Path,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
    trust_anchors: Annotated[
        Path | None, typer.Option(help="PEM roots to judge the signer (default: settings).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """What an image says about itself (XMP/IPTC, C2PA) and whether its signature verifies."""
    from zimage_pipeline.audit.render import render_provenance
    from zimage_pipeline.provenance import read_provenance

    anchors_file = trust_anchors or _settings(config).provenance.c2pa_trust_anchors_file
    pem = anchors_file.read_text(encoding="ascii") if anchors_file else None
    try:
        report = read_provenance(file, trust_anchors_pem=pem)
    except OSError as exc:
        typer.echo(f"error: {file}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_NOT_FOUND) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for line in render_provenance(report):
            typer.echo(line)
    if not report.ok:
        raise typer.Exit(EXIT_BROKEN)


def register(audit_app: typer.Typer, app: typer.Typer) -> None:
    """Attach the audit commands and the `provenance` group to the main CLI."""
    audit_app.command("query")(query)
    audit_app.command("show")(show)
    audit_app.command("verify")(verify)
    audit_app.command("export")(export)
    audit_app.command("anchor")(anchor)
    audit_app.command("redact")(redact)
    provenance_app = typer.Typer(help="Provenance inside images.", no_args_is_help=True)
    provenance_app.command("show")(provenance_show)
    app.add_typer(provenance_app, name="provenance")
