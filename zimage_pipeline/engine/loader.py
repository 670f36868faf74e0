"""Loading: one code path from ``engine.model_path`` to a placed ZImagePipeline.

A Hugging Face repo id is first resolved to its local snapshot directory, so the tiny
test model, a copied snapshot and a downloaded one are all read by the same
``ZImagePipeline.from_pretrained(<directory>)`` call.

ComfyUI's single-file checkpoints are refused on purpose: diffusers 0.42.1 can convert
the transformer file (``ZImageTransformer2DModel.from_single_file``) but has no
single-file loader for the Qwen3 text encoder, and those files carry no tokenizer, so a
pipeline cannot be built from them without a diffusers snapshot anyway.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zimage_pipeline.engine.config import SDPA, SDPA_CUDNN, EngineConfig, Placement
from zimage_pipeline.engine.errors import ModelLoadError, UnsupportedModelLayout
from zimage_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

PIPELINE_CLASS = "ZImagePipeline"
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_SNAPSHOT = re.compile(
    r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})$"
)
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


@dataclass(frozen=True, slots=True)
class ModelLocation:
    directory: Path
    name: str
    revision: str | None
    source: str  # "local" | "hub"


def _single_file_error(what: Path) -> UnsupportedModelLayout:
    return UnsupportedModelLayout(
        f"{what}: single-file (ComfyUI) checkpoints are not supported: diffusers 0.42.1 "
        "has no single-file loader for the Qwen3 text encoder and these files carry no "
        "tokenizer. Point engine.model_path at a diffusers snapshot of "
        "Tongyi-MAI/Z-Image-Turbo (a directory with model_index.json) or at that repo id."
    )


def check_layout(directory: Path) -> None:
    """Raise UnsupportedModelLayout unless directory holds a diffusers ZImagePipeline."""
    index = directory / "model_index.json"
    if not index.is_file():
        if any(p.suffix in _SINGLE_FILE_SUFFIXES for p in directory.iterdir() if p.is_file()):
            raise _single_file_error(directory)
        raise UnsupportedModelLayout(
            f"{directory}: no model_index.json, so not a diffusers pipeline directory "
            "(build a test model with `zimage-pipeline model make-tiny DIR`)"
        )
    try:
        pipeline_class = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UnsupportedModelLayout(f"{index}: unreadable: {exc}") from exc
    if pipeline_class != PIPELINE_CLASS:
        raise UnsupportedModelLayout(
            f"{directory}: a {pipeline_class!r} pipeline, this engine runs {PIPELINE_CLASS}"
        )
    missing = [c for c in COMPONENTS if not (directory / c).is_dir()]
    if missing:
        raise UnsupportedModelLayout(f"{directory}: missing components: {', '.join(missing)}")


def classify_location(location: str) -> Literal["directory", "repo"]:
    """What `engine.model_path` names, after the checks that need no download: a
    directory holding a diffusers ZImagePipeline, or a Hugging Face repo id; anything
    else raises UnsupportedModelLayout. `check` calls this too, so it refuses exactly
    what the worker would refuse at startup."""
    path = Path(location).expanduser()
    if path.is_file():
        raise _single_file_error(path)
    if path.is_dir():
        check_layout(path)
        return "directory"
    if _REPO_ID.match(location) and not location.startswith("."):
        return "repo"
    raise UnsupportedModelLayout(
        f"{location}: not found (neither a directory nor a Hugging Face repo id; "
        "build a test model with `zimage-pipeline model make-tiny DIR`)"
    )


def locate_model(config: EngineConfig) -> ModelLocation:
    location = config.model_path
    path = Path(location).expanduser()
    if classify_location(location) == "directory":
        hub = _HUB_SNAPSHOT.search(path.resolve().as_posix())
        if hub:  # a snapshot inside a Hugging Face cache: keep the repo's name and commit
            name, revision = f"{hub['org']}/{hub['name']}", hub["rev"]
        else:
            name, revision = path.resolve().name, config.revision
        return ModelLocation(directory=path, name=name, revision=revision, source="local")
    return _download(location, config.revision)


def _download(repo_id: str, revision: str | None) -> ModelLocation:
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["model_index.json", *(f"{c}/*" for c in COMPONENTS)],
            )
        )
    except Exception as exc:  # network, auth, missing revision: all fatal at startup
        raise ModelLoadError(f"{repo_id}: cannot fetch from the Hugging Face Hub: {exc}") from exc
    check_layout(snapshot)
    hub = _HUB_SNAPSHOT.search(snapshot.resolve().as_posix())
    return ModelLocation(
        directory=snapshot, name=repo_id, revision=hub["rev"] if hub else revision, source="hub"
    )


def load_pipeline(location: ModelLocation, *, dtype: Any) -> Any:
    import diffusers

    pipeline_class: Any = diffusers.ZImagePipeline
    try:
        pipe = pipeline_class.from_pretrained(
            str(location.directory), dtype=dtype, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"{location.directory}: cannot load the pipeline: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place(pipe: Any, *, device: Any, memory_mode: Placement) -> None:
    """Put the pipeline on its device the way memory_mode says (offload is GPU only)."""
    try:
        if device.type != "cuda" or memory_mode is Placement.GPU:
            if device.type != "cuda" and memory_mode is not Placement.GPU:
                log.warning("engine.memory_mode=%s ignored on %s", memory_mode.value, device)
            pipe.to(device)
        elif memory_mode is Placement.MODEL_OFFLOAD:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot place the pipeline on {device} ({memory_mode}): {exc}"
        ) from exc


def set_attention_backend(pipe: Any, name: str) -> None:
    """sdpa and sdpa_cudnn keep diffusers' native backend; anything else is a diffusers
    backend name, checked here so that a typo or a missing kernel package stops startup."""
    if name in (SDPA, SDPA_CUDNN):
        return
    try:
        pipe.transformer.set_attention_backend(name)
    except Exception as exc:
        raise ConfigError(f"engine.attention_backend={name!r} cannot be used: {exc}") from exc
