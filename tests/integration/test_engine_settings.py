"""The demo's path: `model make-tiny` at the configured model path, then the engine
loaded from settings (TOML + ZIMAGE_* environment), as the worker will load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from zimage_pipeline.checks import check_model
from zimage_pipeline.engine import EngineConfig, GenerationSpec, encode_image, load_engine
from zimage_pipeline.settings import load_settings

pytestmark = pytest.mark.integration


def test_cli_built_model_loads_from_settings_and_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "models" / "tiny"
    env = {**os.environ, "ZIMAGE_ENGINE__MODEL_PATH": str(model)}
    cli = [sys.executable, "-m", "zimage_pipeline.cli", "model", "make-tiny", str(model)]
    built = subprocess.run(cli, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr

    monkeypatch.setenv("ZIMAGE_ENGINE__MODEL_PATH", str(model))
    monkeypatch.setenv("ZIMAGE_ENGINE__DEVICE", "cpu")
    settings = load_settings(PROJECT_ROOT / "config" / "zimage.toml")
    assert check_model(settings).ok

    engine = load_engine(EngineConfig.from_settings(settings.engine))
    assert engine.config.compile is True  # the shipped default; it applies on CUDA only
    [image] = engine.generate(
        [GenerationSpec("a harbour at night", seed=99, width=256, height=256)]
    )
    assert image.seed == 99
    assert np.asarray(image.image).shape == (256, 256, 3)
    assert encode_image(image.image, format="webp", quality=80)[:4] == b"RIFF"
