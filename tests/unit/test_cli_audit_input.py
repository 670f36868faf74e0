"""`zimage-pipeline audit ...` refuses what it cannot use in one line, before touching the
ledger, and says so in one line when the ledger cannot be reached (found by a probe:
tracebacks from OverflowError, "Python int too large" and the database driver)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import PROJECT_ROOT
from zimage_pipeline.cli import app


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--from", "9999-12-31T23:59:59-05:00"], "out of range"),
        (["--to", "0001-01-01T00:00:00+05:00"], "out of range"),
        (["--from", "yesterday"], "not an ISO 8601 time"),
        (["--limit", "9223372036854775808"], "--limit"),
        (["--limit", "-1"], "--limit"),
        (["--template", "hero", "--template-version", "99999999999999999999"], "--template-ver"),
        (["--status", "bogus"], "one of authorized, cancelled"),
        (["--from", "2026-03-12", "--to", "2026-03-11"], "is not before --to"),
    ],
)
def test_a_value_the_query_cannot_use_is_refused(args: list[str], problem: str) -> None:
    unreachable = {"ZIMAGE_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:9/none"}
    result = CliRunner().invoke(app, ["audit", "query", *args], env=unreachable)
    assert result.exit_code == 2, result.output
    assert problem in result.output and "Traceback" not in result.output


def test_an_unreachable_ledger_is_one_error_line() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "zimage_pipeline.cli", "audit", "query"],
        cwd=PROJECT_ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "ZIMAGE_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: the ledger cannot be reached: ")
    assert "Traceback" not in completed.stderr and "nobody" not in completed.stderr


def test_show_refuses_a_format_it_does_not_write() -> None:
    unreachable = {"ZIMAGE_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:9/none"}
    result = CliRunner().invoke(app, ["audit", "show", "r1", "--format", "yaml"], env=unreachable)
    assert result.exit_code == 2 and "text or json" in result.output


def test_csv_cells_a_spreadsheet_would_run_are_quoted() -> None:
    """Labels and prompts come from clients: `=HYPERLINK(...)` in a label must reach a
    compliance officer's spreadsheet as text (OWASP CSV injection)."""
    from datetime import UTC, datetime

    from zimage_pipeline.audit.queries import RequestSummary
    from zimage_pipeline.audit.render import render_requests

    at = datetime(2026, 3, 1, tzinfo=UTC)
    summary = RequestSummary(
        request_id="r1",
        subject="alice",
        principal="cms",
        model=None,
        status="published",
        reason=None,
        first_at=at,
        last_at=at,
        events=5,
        prompt_sha256=None,
        prompt="-2+3 a fox",
        groups=('=HYPERLINK("http://x","y")',),
        labels={"sku": ["SKU-1"]},
    )
    _header, row = list(render_requests([summary], "csv"))
    assert "'=HYPERLINK" in row and "'-2+3 a fox" in row
    assert ",alice," in row  # ordinary cells as they are
