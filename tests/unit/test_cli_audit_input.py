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
