from __future__ import annotations

import os
import stat
from pathlib import Path

from typer.testing import CliRunner

from zimage_pipeline.cli import app
from zimage_pipeline.engine.identity import identify
from zimage_pipeline.engine.loader import check_layout


def test_make_tiny_writes_a_reproducible_diffusers_layout(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    check_layout(tmp_path / "again")
    same = identify(tmp_path / "again", name="t", revision=None, source="local")
    first = identify(tiny_model_dir, name="t", revision=None, source="local")
    assert same.files == first.files, "same seed, same files"
    assert same.weights_sha256[:16] in result.output


def test_make_tiny_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(app, ["model", "make-tiny", str(target)])
    assert refused.exit_code == 2
    assert (target / "notes.txt").exists()
    forced = CliRunner().invoke(app, ["model", "make-tiny", "--force", "--seed", "3", str(target)])
    assert forced.exit_code == 0, forced.output
    assert (target / "model_index.json").is_file()
    assert not (target / "notes.txt").exists()


def test_make_tiny_leaves_a_directory_others_may_read_under_the_umask(tmp_path: Path) -> None:
    # The image builds the model as root and the worker reads it as uid 10001: a 0700
    # directory (what a temporary directory is made with) would lock the worker out.
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["model", "make-tiny", str(tmp_path / "shared")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o755
    assert not list(tmp_path.glob(".shared.*")), "no staging directory left behind"
