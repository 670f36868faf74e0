"""VAE decoding in chunks of ``vae_decode_batch`` images gives the images of one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.unit.engine.conftest import SIZE
from zimage_pipeline.engine import EngineConfig, GenerationSpec, TurboEngine
from zimage_pipeline.errors import ConfigError


def test_chunked_decode_calls_the_decoder_per_chunk_and_keeps_the_images(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = [GenerationSpec("a fox", seed=s, width=SIZE, height=SIZE) for s in (1, 2, 3)]
    whole = make_engine(vae_decode_batch=4).generate(specs)
    engine = make_engine(vae_decode_batch=2)
    calls: list[int] = []
    original = engine.pipeline.vae.decode

    def counting(latents: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(latents.shape[0]))
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(engine.pipeline.vae, "decode", counting)
    chunked = engine.generate(specs)
    assert calls == [2, 1]
    for a, b in zip(whole, chunked, strict=True):
        x = np.asarray(a.image, dtype=np.int16)
        y = np.asarray(b.image, dtype=np.int16)
        assert int(np.abs(x - y).max()) <= 1  # float32: at most a rounding flip


def test_vae_decode_batch_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="vae_decode_batch"):
        EngineConfig(model_path="m", vae_decode_batch=0)
