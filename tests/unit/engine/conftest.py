"""The tiny model is built once per session; engines over it load in a fraction of a second."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from zimage_pipeline.engine import EngineConfig, TurboEngine, load_engine
from zimage_pipeline.engine.tiny import make_tiny_model

SIZE = 128  # small enough to keep each image well under 0.1 s on a CI core


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Callable[..., TurboEngine]:
    def make(**overrides: object) -> TurboEngine:
        options: dict[str, object] = {"model_path": str(tiny_model_dir), "device": "cpu"}
        options.update(overrides)
        return load_engine(EngineConfig(**options))  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TurboEngine:
    """A shared engine for tests that only read; fault tests build their own."""
    return load_engine(EngineConfig(model_path=str(tiny_model_dir), device="cpu"))
