"""One loading path, and a clear startup error for everything it cannot read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from zimage_pipeline.engine import EngineConfig, ModelLoadError, UnsupportedModelLayout, load_engine
from zimage_pipeline.engine.loader import locate_model
from zimage_pipeline.errors import ConfigError, Disposition


def config(path: Path | str, **kw: Any) -> EngineConfig:
    return EngineConfig(model_path=str(path), device="cpu", **kw)


def refused(path: Path | str) -> UnsupportedModelLayout:
    with pytest.raises(UnsupportedModelLayout) as caught:
        locate_model(config(path))
    assert caught.value.disposition is Disposition.FATAL
    assert caught.value.reason == "MODEL_LAYOUT_UNSUPPORTED"
    return caught.value


def test_a_missing_path_says_how_to_build_a_test_model(tmp_path: Path) -> None:
    assert "make-tiny" in str(refused(tmp_path / "nowhere" / "model"))


def test_an_empty_directory_is_not_a_pipeline(tmp_path: Path) -> None:
    assert "model_index.json" in str(refused(tmp_path))


@pytest.mark.parametrize("name", ["z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors"])
def test_comfyui_single_files_are_refused_with_the_reason(tmp_path: Path, name: str) -> None:
    checkpoint = tmp_path / name
    checkpoint.write_bytes(b"\0" * 16)
    for target in (checkpoint, tmp_path):  # the file itself, or a folder of such files
        message = str(refused(target))
        assert "single-file" in message
        assert "text encoder" in message


def test_another_pipeline_class_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert "FluxPipeline" in str(refused(tmp_path))


def test_a_pipeline_missing_a_component_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "tokenizer")
    assert "tokenizer" in str(refused(copy))


def test_corrupt_weights_are_a_fatal_load_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_engine(config(copy))
    assert caught.value.disposition is Disposition.FATAL


def test_an_unknown_attention_backend_stops_startup(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="attention_backend"):
        load_engine(config(tiny_model_dir, attention_backend="warp_drive"))


def test_a_repo_id_is_resolved_to_its_snapshot_and_loaded_the_same_way(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / revision
    shutil.copytree(tiny_model_dir, snapshot)
    asked: dict[str, Any] = {}

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        asked.update(kwargs, repo_id=repo_id)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    engine = load_engine(config("Tongyi-MAI/Z-Image-Turbo", revision="main"))

    assert asked["repo_id"] == "Tongyi-MAI/Z-Image-Turbo"
    assert asked["revision"] == "main"
    assert "transformer/*" in asked["allow_patterns"]
    assert (engine.identity.name, engine.identity.revision) == (
        "Tongyi-MAI/Z-Image-Turbo",
        revision,
    )
    assert engine.identity.source == "hub"


def test_no_network_for_a_repo_id_is_a_fatal_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(repo_id: str, **kwargs: Any) -> str:
        raise OSError("cannot reach the Hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="Tongyi-MAI/Z-Image-Turbo"):
        locate_model(config("Tongyi-MAI/Z-Image-Turbo"))
