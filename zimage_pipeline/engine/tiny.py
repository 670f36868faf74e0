"""`zimage-pipeline model make-tiny DIR`: a tiny random-weight Z-Image pipeline.

Same classes as the real model, saved in diffusers layout, so tests and the demo load it
through exactly the loader the real model goes through. Seeded: the same seed and torch
version give the same files.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from zimage_pipeline.engine.architecture import TINY, build_random_pipeline
from zimage_pipeline.errors import ConfigError

DEFAULT_SEED = 20251127


def make_tiny_model(directory: Path, *, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Build and save the tiny pipeline into directory (created; must be empty unless force).

    Written to a temporary sibling first and renamed, so an interrupted build never
    leaves a directory that looks like a model.
    """
    directory = directory.expanduser()
    if directory.exists() and any(directory.iterdir()):
        if not force:
            raise ConfigError(f"{directory} is not empty (use --force to replace it)")
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_random_pipeline(TINY, seed=seed)
    # mkdir, not tempfile.mkdtemp: mkdtemp makes the directory 0700, and the renamed model
    # would then be unreadable to the worker's own user in an image or on a shared volume.
    staging = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
