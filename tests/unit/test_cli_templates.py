"""`zimage-pipeline templates ...` as the brand team runs it: one `error:` line and a
non-zero exit for every mistake, never a traceback; the shipped catalogue otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zimage_pipeline.cli import app

SHIPPED = str(Path(__file__).resolve().parents[2] / "config" / "templates")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["templates", *args, "--dir", SHIPPED])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_render_prints_the_request_a_template_makes() -> None:
    code, output = run("render", "ecommerce-hero", "--var", "product=Blue teapot")
    assert code == 0, output
    rendered = json.loads(output)
    assert rendered["prompt"].startswith("Studio product photograph of Blue teapot")
    assert rendered["template"]["id"] == "ecommerce-hero" and rendered["template"]["version"]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        # Found by a probe: version 0 was dropped and the newest version rendered.
        (("render", "ecommerce-hero", "--version", "0", "--var", "product=teapot"), "version"),
        # The id and version go through the contract: one line, not a validation dump.
        (("show", "../etc"), "error: template: id: String should match pattern"),
        (("show", "ecommerce-hero", "--version", "0"), "error: template: version:"),
        (("show", "no-such-template"), "error: template: 'no-such-template' is not in"),
    ],
)
def test_a_mistake_is_one_error_line(args: tuple[str, ...], problem: str) -> None:
    code, output = run(*args)
    assert code != 0
    assert problem in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output


def test_a_variable_given_twice_is_refused() -> None:
    code, output = run("render", "ecommerce-hero", "--var", "product=a", "--var", "product=b")
    assert code == 2 and "--var product: given twice" in output
