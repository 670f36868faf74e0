"""`check`'s model line runs the worker's own layout checks (engine.loader), so it fails
on exactly what the worker would refuse at startup, before any weights are read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from zimage_pipeline.checks import check_model
from zimage_pipeline.engine.loader import COMPONENTS, PIPELINE_CLASS
from zimage_pipeline.settings import load_settings


def layout(root: Path, *, pipeline: str = PIPELINE_CLASS, skip: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    for component in COMPONENTS:
        if component != skip:
            (root / component).mkdir()
    return root


def checked(location: str) -> tuple[bool, str]:
    result = check_model(load_settings(engine={"model_path": location}))
    return result.ok, result.detail


def test_a_diffusers_z_image_directory_passes(tmp_path: Path) -> None:
    ok, detail = checked(str(layout(tmp_path / "turbo")))
    assert ok and PIPELINE_CLASS in detail


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda root: layout(root, pipeline="StableDiffusionXLPipeline"), "StableDiffusionXL"),
        (lambda root: layout(root, skip="vae"), "missing components: vae"),
    ],
)
def test_what_the_worker_would_refuse_fails(
    tmp_path: Path, build: Callable[[Path], Path], named: str
) -> None:
    root = build(tmp_path / "model")
    ok, detail = checked(str(root))
    assert not ok and named in detail


def test_a_single_file_checkpoint_fails_saying_why(tmp_path: Path) -> None:
    checkpoint = tmp_path / "z_image_turbo.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    ok, detail = checked(str(checkpoint))
    assert not ok and "single-file (ComfyUI)" in detail


def test_a_repo_id_is_fetched_at_load_time_and_nothing_else_passes(tmp_path: Path) -> None:
    assert checked("Tongyi-MAI/Z-Image-Turbo") == (
        True,
        "Tongyi-MAI/Z-Image-Turbo: Hugging Face repo id (fetched at load time)",
    )
    ok, detail = checked(str(tmp_path / "nowhere"))
    assert not ok and "make-tiny" in detail
