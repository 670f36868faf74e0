"""Fixtures of the fault matrix: the tiny model, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_pipeline.engine.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fault-matrix-model") / "tiny")
