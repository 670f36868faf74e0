"""`audit query --template ID` on SQLite and PostgreSQL: the index folds the `template`
of the received event (merged in SQL by the upsert however the events are batched),
the query filters on it with the others, and the CLI and the export show it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from zimage_pipeline.audit import AuditFilter, AuditLog, export_bundle, query_requests
from zimage_pipeline.audit.errors import ExportError
from zimage_pipeline.cli import app
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.db import create_ledger_engine
from zimage_pipeline.ledger.models import AuditRequest
from zimage_pipeline.ports import AuditRecord
from zimage_pipeline.settings import DatabaseSettings

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
SHA = "cd" * 32


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    engine = create_ledger_engine(DatabaseSettings(url=ledger_url, pool_size=4))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def template(template_id: Any = "hero-on-white", version: Any = 2) -> dict[str, Any]:
    return {
        "id": template_id,
        "version": version,
        "sha256": SHA,
        "variables": {"product": "red kettle", "colour": "white"},
    }


def steps(
    user: str, tpl: dict[str, Any] | None, *, denied: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    received: dict[str, Any] = {"user": user, "principal": "cms", "prompt": f"shot for {user}"}
    if tpl is not None:
        received["template"] = tpl
    if denied:
        return [("received", received), ("denied", {"reason": "NOT_AUTHORIZED"})]
    return [
        ("received", received),
        ("authorized", {"groups": ["marketing"]}),
        ("generated", {"model": "Z@r1"}),
        ("stored", {"keys": ["k"]}),
        ("published", {}),
    ]


def record(
    log: AuditLog, request_id: str, story: list[tuple[str, dict[str, Any]]], at: datetime
) -> None:
    for i, (event_type, payload) in enumerate(story):
        log.append(
            request_id=request_id,
            event_type=event_type,
            actor="worker-1",
            payload=payload,
            at=at + timedelta(seconds=i),
        )


def ids(engine: Engine, **filters: Any) -> list[str]:
    return [s.request_id for s in query_requests(engine, AuditFilter(**filters))]


def index_row(engine: Engine, request_id: str) -> tuple[str | None, int | None]:
    with engine.connect() as conn:
        row = conn.execute(
            select(AuditRequest.template_id, AuditRequest.template_version).where(
                AuditRequest.request_id == request_id
            )
        ).one()
    return row[0], row[1]


@pytest.fixture
def ledger(engine: Engine) -> Engine:
    """Five requests an hour apart: three from templates (two ids, two versions of one),
    one free prompt, one denied template request."""
    log = AuditLog(engine)
    record(log, "req-1", steps("mia", template(version=1)), T0)
    record(log, "req-2", steps("mia", None), T0 + timedelta(hours=1))
    record(log, "req-3", steps("ola", template(version=2)), T0 + timedelta(hours=2))
    record(log, "req-4", steps("mia", template("banner-3x1", 1)), T0 + timedelta(hours=3))
    record(log, "req-5", steps("ivo", template(), denied=True), T0 + timedelta(hours=4))
    return engine


def test_query_by_template_alone_and_with_the_other_filters(ledger: Engine) -> None:
    assert ids(ledger, template="hero-on-white") == ["req-5", "req-3", "req-1"]
    assert ids(ledger, template="banner-3x1") == ["req-4"]
    assert ids(ledger, template="no-such-template") == []
    assert ids(ledger, template="hero-on-white", template_version=1) == ["req-1"]
    assert ids(ledger, template="hero-on-white", template_version=2) == ["req-5", "req-3"]
    assert ids(ledger, template="hero-on-white", user="mia") == ["req-1"]
    assert ids(ledger, template="hero-on-white", status="published") == ["req-3", "req-1"]
    assert ids(ledger, template="hero-on-white", reason="NOT_AUTHORIZED") == ["req-5"]
    assert ids(ledger, template="hero-on-white", group="marketing") == ["req-3", "req-1"]
    assert ids(ledger, template="hero-on-white", model="Z@r1") == ["req-3", "req-1"]
    window = {"since": T0 + timedelta(minutes=30), "until": T0 + timedelta(hours=3)}
    assert ids(ledger, template="hero-on-white", **window) == ["req-3"]
    assert ids(ledger, template="hero-on-white", limit=1) == ["req-5"]
    # The free-prompt request has no template and is in every unfiltered answer.
    assert ids(ledger) == ["req-5", "req-4", "req-3", "req-2", "req-1"]
    (free,) = [s for s in query_requests(ledger, AuditFilter(user="mia")) if s.template is None]
    assert free.request_id == "req-2"
    (hit,) = query_requests(ledger, AuditFilter(template="banner-3x1"))
    assert (hit.template_id, hit.template_version, hit.template) == (
        "banner-3x1",
        1,
        "banner-3x1@v1",
    )
    assert hit.to_dict()["template"] == {"id": "banner-3x1", "version": 1}


def test_malformed_templates_are_kept_in_the_trail_but_not_indexed(engine: Engine) -> None:
    log = AuditLog(engine)
    bad: list[Any] = [
        "hero-on-white",
        ["hero-on-white", 1],
        {"version": 1},
        template(None),
        template(17),
        template("x" * 65),
        template("Hero On White"),
        template("hero\x00white"),
    ]
    for n, value in enumerate(bad):
        log.append(
            request_id=f"bad-{n}",
            event_type="received",
            actor="w",
            payload={"user": "eve", "template": value},
            at=T0,
        )
        assert index_row(engine, f"bad-{n}") == (None, None), value
    log.append(
        request_id="bad-version",
        event_type="received",
        actor="w",
        payload={"user": "eve", "template": template(version="7")},
        at=T0,
    )
    assert index_row(engine, "bad-version") == ("hero-on-white", None)
    assert ids(engine, user="eve", limit=None) == sorted(
        [f"bad-{n}" for n in range(len(bad))] + ["bad-version"], reverse=True
    )


STORY: list[tuple[str, dict[str, Any]]] = [
    ("received", {"user": "mia", "template": template(version=1)}),
    ("authorized", {"groups": ["marketing"]}),
    ("failed", {"reason": "ENGINE_OOM"}),
    # The redelivery renders from the catalogue of its time: version 2 made the image.
    ("received", {"user": "mia", "template": template(version=2)}),
    ("generated", {"model": "Z@r1", "template": "not a mapping"}),
    ("received", {"user": "mia", "template": template("Bad Id", version=9)}),
    ("published", {}),
]


def test_template_columns_are_the_same_however_the_events_are_batched(engine: Engine) -> None:
    """The upsert merges a batch into the existing row in SQL (`_merged_columns`); the
    template columns must come out as folding the events one by one gives them."""
    log = AuditLog(engine)
    n = len(STORY)
    prefix = uuid.uuid4().hex[:8]
    splits = {
        f"{prefix}-one-by-one": [1] * n,
        f"{prefix}-one-batch": [n],
        f"{prefix}-first-then-rest": [1, n - 1],
        f"{prefix}-pairs": [2] * (n // 2) + [1] * (n % 2),
        f"{prefix}-three-then-rest": [3, n - 3],
        f"{prefix}-four-then-rest": [4, n - 4],
    }
    for request_id, sizes in splits.items():
        done = 0
        for size in sizes:
            batch = STORY[done : done + size]
            log.append_many([AuditRecord(request_id, t, "w", p) for t, p in batch], at=T0)
            done += size
    assert {index_row(engine, request_id) for request_id in splits} == {("hero-on-white", 2)}


def test_a_later_batch_without_a_template_keeps_it(engine: Engine) -> None:
    log = AuditLog(engine)
    log.append(request_id="r", event_type="received", actor="w", payload={"template": template()})
    log.append_many(
        [
            AuditRecord("r", "authorized", "w", {"groups": ["g"]}),
            AuditRecord("r", "published", "w", {"template": {"id": 5}}),
        ]
    )
    assert index_row(engine, "r") == ("hero-on-white", 2)
    # A later template without a usable version replaces the pair, not the id alone.
    log.append(
        request_id="r",
        event_type="received",
        actor="w",
        payload={"template": template("banner-3x1", version="two")},
    )
    assert index_row(engine, "r") == ("banner-3x1", None)


def test_cli_query_by_template(ledger: Engine, ledger_url: str) -> None:
    runner, env = CliRunner(), {"ZIMAGE_DATABASE__URL": ledger_url}

    table = runner.invoke(app, ["audit", "query", "--template", "hero-on-white"], env=env)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == [
        *("first_at", "request_id", "user", "status", "reason", "model"),
        *("template", "events", "labels"),
    ]
    assert [line.split()[1] for line in lines[1:-1]] == ["req-5", "req-3", "req-1"]
    assert "hero-on-white@v2" in lines[1] and "hero-on-white@v1" in lines[3]
    assert lines[-1] == "(3 requests)"

    # A page without templated requests reads as before: no template column.
    plain = runner.invoke(
        app,
        [
            "audit",
            "query",
            "--user",
            "mia",
            "--from",
            "2026-12-01T09:30",
            "--to",
            "2026-12-01T10:30",
        ],
        env=env,
    )
    assert plain.exit_code == 0, plain.output
    assert "template" not in plain.output.splitlines()[0]
    assert "(1 request)" in plain.output

    jsonl = runner.invoke(
        app,
        [
            "audit",
            "query",
            "--template",
            "hero-on-white",
            "--template-version",
            "1",
            "--format",
            "jsonl",
        ],
        env=env,
    )
    assert jsonl.exit_code == 0, jsonl.output
    rows = [json.loads(line) for line in jsonl.output.splitlines()]
    assert [(r["request_id"], r["template"]) for r in rows] == [
        ("req-1", {"id": "hero-on-white", "version": 1})
    ]

    combined = runner.invoke(
        app,
        ["audit", "query", "--template", "hero-on-white", "--status", "denied", "--format", "csv"],
        env=env,
    )
    assert combined.exit_code == 0, combined.output
    header, *records = combined.output.splitlines()
    assert header.endswith(",template_id,template_version")
    assert [r.split(",")[1] for r in records] == ["req-5"]
    assert records[0].endswith(",hero-on-white,2")

    orphan = runner.invoke(app, ["audit", "query", "--template-version", "2"], env=env)
    assert orphan.exit_code == 2
    assert "--template" in orphan.output

    shown = runner.invoke(app, ["audit", "show", "req-4"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "  template banner-3x1@v1" in shown.output.splitlines()


def test_export_carries_the_template_of_each_request(ledger: Engine, tmp_path: Path) -> None:
    export_bundle(ledger, tmp_path / "bundle", since=T0, until=T0 + timedelta(days=1))
    lines = (tmp_path / "bundle" / "requests.jsonl").read_text(encoding="utf-8").splitlines()
    templates = {row["request_id"]: row["template"] for row in map(json.loads, lines)}
    assert templates == {
        "req-1": {"id": "hero-on-white", "version": 1},
        "req-2": None,
        "req-3": {"id": "hero-on-white", "version": 2},
        "req-4": {"id": "banner-3x1", "version": 1},
        "req-5": {"id": "hero-on-white", "version": 2},
    }


def test_an_export_of_a_broken_ledger_never_says_verified(ledger: Engine, tmp_path: Path) -> None:
    """Found by a probe: the export checked only the links inside its range, so a ledger
    whose retained prompt (or an event outside the range) was rewritten exported as
    "chain verified". The export now carries the whole ledger's verdict."""
    from sqlalchemy import update

    from zimage_pipeline.ledger.models import AuditEventRow

    whole = (T0, T0 + timedelta(days=1))
    clean = export_bundle(ledger, tmp_path / "clean", since=whole[0], until=whole[1])
    assert clean["chain_verified"] and clean["ledger_problem"] is None
    with ledger.begin() as conn:
        conn.execute(update(AuditEventRow).where(AuditEventRow.seq == 1).values(actor="mallory"))
    later = (T0 + timedelta(hours=3), whole[1])  # a range that does not hold event 1
    broken = export_bundle(ledger, tmp_path / "broken", since=later[0], until=later[1])
    assert not broken["chain_verified"]
    assert broken["ledger_problem"].startswith("event 1 (req-1 ")


def test_an_export_range_with_an_offset_is_the_same_instant_in_utc(
    ledger: Engine, tmp_path: Path
) -> None:
    """Found by a probe: on SQLite an offset was ignored (wall time compared), so
    `--from 10:00+01:00` exported what 10:00 UTC holds, silently missing events."""
    plus_one = timezone(timedelta(hours=1))
    since = (T0 + timedelta(hours=1)).astimezone(plus_one)  # req-2's hour, as 11:00+01:00
    manifest = export_bundle(
        ledger, tmp_path / "tz", since=since, until=since + timedelta(minutes=30)
    )
    lines = (tmp_path / "tz" / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert manifest["events"]["count"] > 0
    assert {json.loads(line)["request_id"] for line in lines} == {"req-2"}
    with pytest.raises(ExportError, match="is not before"):
        export_bundle(ledger, tmp_path / "reversed", since=T0 + timedelta(hours=2), until=T0)


def test_verify_checks_the_query_index_against_the_events(ledger: Engine) -> None:
    """Found by a probe: `audit query` and `audit show` read the index, which an edit
    could change without `audit verify` noticing. It now folds each request's events
    again and names every row, group or label that disagrees."""
    from sqlalchemy import delete, update

    from zimage_pipeline.audit.index_check import check_index
    from zimage_pipeline.ledger.models import AuditRequestGroup, AuditRequestLabel

    assert check_index(ledger) == []
    with ledger.begin() as conn:
        conn.execute(
            update(AuditRequest)
            .where(AuditRequest.request_id == "req-3")
            .values(subject="bob", template_version=1)
        )
        conn.execute(delete(AuditRequestGroup).where(AuditRequestGroup.request_id == "req-1"))
        conn.execute(
            AuditRequestLabel.__table__.insert().values(
                request_id="req-2", key="sku", value="forged"
            )
        )
    problems = check_index(ledger)
    assert "index: request req-3: subject is 'bob', the events say 'ola'" in problems
    assert "index: request req-3: template_version is 1, the events say 2" in problems
    assert "index: request req-1: groups are [], the events say ['marketing']" in problems
    assert any(
        "req-2: labels missing [], not in any event [('sku', 'forged')]" in p for p in problems
    )
    assert len(problems) == 4


def test_a_failed_export_leaves_nothing_behind(ledger: Engine, tmp_path: Path) -> None:
    """Found by a probe: an export whose signing key was unusable exited 1 but left a
    complete-looking unsigned bundle (and a retry then failed with "is not empty")."""
    key = tmp_path / "not-a-key.pem"
    key.write_text("not a key\n", encoding="utf-8")
    exports = tmp_path / "exports"
    exports.mkdir()
    target = exports / "bundle"
    with pytest.raises(ExportError, match="signing key"):
        export_bundle(ledger, target, since=T0, until=T0 + timedelta(days=1), signing_key_file=key)
    assert list(exports.iterdir()) == []
    done = export_bundle(ledger, target, since=T0, until=T0 + timedelta(days=1))
    assert done["events"]["count"] > 0 and (target / "manifest.json").is_file()
