"""The Turbo engine: Z-Image-Turbo through diffusers' ZImagePipeline.

    engine = load_engine(EngineConfig.from_settings(settings.engine))
    engine.warmup()                                   # compiles before the first request
    images = engine.generate([GenerationSpec("a fox", seed=7)])
    data = encode_image(images[0].image, format="webp", quality=90)   # any thread

Importing this package does not import torch; load_engine does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

from zimage_pipeline.engine.config import EngineConfig, Placement, compute_dtype, resolve_device
from zimage_pipeline.engine.encode import encode_image
from zimage_pipeline.engine.engine import TurboEngine
from zimage_pipeline.engine.errors import (
    DeviceFailure,
    GenerationFailed,
    GpuOutOfMemory,
    InvalidGenerationSpec,
    ModelLoadError,
    UnsupportedModelLayout,
)
from zimage_pipeline.engine.identity import ModelIdentity, identify
from zimage_pipeline.engine.types import GeneratedImage, GenerationSpec, StageTimings

log = logging.getLogger(__name__)

__all__ = [
    "DeviceFailure",
    "EngineConfig",
    "GeneratedImage",
    "GenerationFailed",
    "GenerationSpec",
    "GpuOutOfMemory",
    "InvalidGenerationSpec",
    "ModelIdentity",
    "ModelLoadError",
    "Placement",
    "StageTimings",
    "TurboEngine",
    "UnsupportedModelLayout",
    "encode_image",
    "load_engine",
]


def lossy_identity(identity: ModelIdentity, transformer: Any) -> ModelIdentity:
    """The FP8 tier's images are not the model's own output: its name says so in the
    result, the audit record and the image's provenance (`...+fp8-lossy`), so nobody
    mistakes one for the other. The weights digest stays the checkpoint's."""
    from zimage_pipeline.engine.fp8 import LOSSY_SUFFIX, runs_fp8

    if not runs_fp8(transformer):
        return identity
    return dataclasses.replace(identity, name=identity.name + LOSSY_SUFFIX)


def load_engine(config: EngineConfig) -> TurboEngine:
    """Locate, identify, load, place and optimize the model (no warmup; call warmup()).

    Every failure here is fatal for the worker (UnsupportedModelLayout, ModelLoadError,
    ConfigError): it cannot serve without a model.
    """
    from zimage_pipeline.engine.loader import (
        load_pipeline,
        locate_model,
        place,
        set_attention_backend,
    )
    from zimage_pipeline.engine.optimize import optimize_pipeline

    marks = [time.perf_counter()]
    device = resolve_device(config.device)
    location = locate_model(config)
    identity = identify(
        location.directory, name=location.name, revision=location.revision, source=location.source
    )
    marks.append(time.perf_counter())
    pipe = load_pipeline(location, dtype=compute_dtype(device))
    marks.append(time.perf_counter())
    place(pipe, device=device, memory_mode=config.memory_mode)
    marks.append(time.perf_counter())
    set_attention_backend(pipe, config.attention_backend)
    compiled = optimize_pipeline(pipe, config=config, device=device)
    if config.linear_fp8:
        identity = lossy_identity(identity, pipe.transformer)
    marks.append(time.perf_counter())
    steps = [b - a for a, b in itertools.pairwise(marks)]
    log.info(
        "model %s (revision %s, sha256 %s) on %s in %.1fs "
        "(identify %.1fs, read %.1fs, place %.1fs, optimize %.1fs)",
        identity.name,
        identity.revision,
        identity.weights_sha256[:16],
        device,
        marks[-1] - marks[0],
        *steps,
    )
    return TurboEngine(pipe, config=config, device=device, identity=identity, compiled=compiled)
