"""The audit index's template columns: what a `template` payload mapping folds into.

The SQL side (the upsert merging a batch into an existing row, the query, the CLI) is in
tests/integration/test_audit_templates.py on SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from zimage_pipeline.audit.index import fold_events, template_of
from zimage_pipeline.audit.queries import RequestSummary
from zimage_pipeline.audit.render import COLUMNS, render_requests, render_story

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
SHA = "ab" * 32


@dataclass(frozen=True)
class Event:
    event_type: str
    payload: dict[str, Any]
    request_id: str = "req-1"
    at: datetime = T0
    prompts: dict[str, str] | None = field(default=None)


def template(template_id: Any = "hero-on-white", version: Any = 3) -> dict[str, Any]:
    return {"id": template_id, "version": version, "sha256": SHA, "variables": {"sku": "A1"}}


def test_a_well_formed_template_gives_its_id_and_version() -> None:
    assert template_of(template()) == ("hero-on-white", 3)
    assert template_of(template("a")) == ("a", 3)
    assert template_of(template("x" * 64)) == ("x" * 64, 3)
    assert template_of(template("9-lives-2")) == ("9-lives-2", 3)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "hero-on-white",  # a bare string is not the mapping the contract names
        ["hero-on-white", 3],
        42,
        {},
        {"version": 3},
        template(None),
        template(7),
        template(["hero"]),
        template(""),
        template("x" * 65),  # over-long
        template("Hero-On-White"),  # not the catalogue's spelling
        template("-leading-dash"),
        template("hero on white"),
        template("hero\nwhite"),
        template("hero-on-white\n"),  # fullmatch, not match: no trailing newline
        template("héro"),
    ],
)
def test_a_malformed_template_is_not_indexed(value: Any) -> None:
    assert template_of(value) is None


@pytest.mark.parametrize("version", [None, "3", 3.0, 0, -1, True, 2**31, {"v": 3}])
def test_a_bad_version_keeps_the_id_without_one(version: Any) -> None:
    assert template_of(template(version=version)) == ("hero-on-white", None)


def test_the_largest_version_the_column_holds_is_kept() -> None:
    assert template_of(template(version=2**31 - 1)) == ("hero-on-white", 2**31 - 1)


def test_fold_takes_the_template_from_the_received_event() -> None:
    values = fold_events(
        None,
        [
            Event("received", {"user": "mia", "template": template()}),
            Event("authorized", {"groups": ["marketing"]}),
            Event("published", {}),
        ],
    )
    assert (values["template_id"], values["template_version"]) == ("hero-on-white", 3)


def test_fold_without_a_template_sets_no_template_column() -> None:
    values = fold_events(None, [Event("received", {"user": "dan", "prompt": "free"})])
    assert "template_id" not in values and "template_version" not in values


def test_fold_keeps_the_latest_template_like_the_other_columns() -> None:
    """A redelivery records `received` again, rendered from the catalogue of its time:
    the delivery that makes the image is the last one, so its version is the one kept;
    an event without (or with a malformed) template changes nothing."""
    values = fold_events(
        None,
        [
            Event("received", {"template": template(version=3)}),
            Event("failed", {"reason": "ENGINE_OOM", "template": "garbage"}),
            Event("received", {"template": template(version=4)}),
            Event("generated", {"model": "Z", "template": {"id": "Not Valid", "version": 9}}),
        ],
    )
    assert (values["template_id"], values["template_version"]) == ("hero-on-white", 4)


def test_fold_keeps_id_and_version_as_one_pair() -> None:
    values = fold_events(
        None,
        [
            Event("received", {"template": template(version=3)}),
            Event("received", {"template": template("banner-3x1", version="bad")}),
        ],
    )
    assert (values["template_id"], values["template_version"]) == ("banner-3x1", None)


def summary(request_id: str, template_id: str | None, version: int | None) -> RequestSummary:
    return RequestSummary(
        request_id=request_id,
        first_at=T0,
        last_at=T0 + timedelta(seconds=6),
        status="published",
        reason=None,
        subject="mia",
        principal="cms",
        model="Z@r1",
        events=7,
        prompt_sha256=None,
        prompt=None,
        template_id=template_id,
        template_version=version,
    )


def test_table_shows_a_template_column_only_when_a_row_has_one() -> None:
    plain = list(render_requests([summary("req-1", None, None)], "table"))
    assert plain[0].split() == list(COLUMNS)
    mixed = list(
        render_requests(
            [summary("req-2", "hero-on-white", 3), summary("req-1", None, None)], "table"
        )
    )
    header = mixed[0].split()
    assert header == [*COLUMNS[:6], "template", *COLUMNS[6:]]
    # Under its header (the empty reason cell leaves no word to split on).
    assert mixed[1].index("hero-on-white@v3") == mixed[0].index("template")
    assert mixed[-1] == "(2 requests)"


def test_jsonl_csv_and_story_carry_the_template() -> None:
    row = summary("req-2", "hero-on-white", 3)
    assert '"template": {"id": "hero-on-white", "version": 3}' in next(
        iter(render_requests([row], "jsonl"))
    )
    assert '"template": null' in next(iter(render_requests([summary("r", None, None)], "jsonl")))
    header, line = render_requests([row], "csv")
    assert header.split(",")[: len(COLUMNS)] == list(COLUMNS)  # positions unchanged
    assert header.endswith(",template_id,template_version")
    assert line.endswith(",hero-on-white,3")
    assert "  template hero-on-white@v3" in list(render_story(row, [], "text"))
    assert summary("r", "banner-3x1", None).template == "banner-3x1"
