"""Lossless speed-ups: the real-valued RoPE computes diffusers' complex rotation.

Tolerance: in float32 on the CPU the two rotations differ only in rounding order, so the
whole transformer forward must agree to 1e-5 relative (bf16 on the GPU rounds at ~4e-3,
three orders above). The benchmark checks the same on the full-size model in bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.engine.conftest import SIZE
from zimage_pipeline.engine import EngineConfig, GenerationSpec, TurboEngine
from zimage_pipeline.engine.engine import to_pil
from zimage_pipeline.engine.optimize import use_compile_cache
from zimage_pipeline.engine.rope import rotate, use_real_rope
from zimage_pipeline.settings import EngineSettings


def _complex_rotation(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # diffusers 0.42.1, ZSingleStreamAttnProcessor.apply_rotary_emb
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(x)


def test_rotate_equals_the_complex_multiplication() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 4, 16, generator=g)
    angles = torch.rand(2, 37, 8, generator=g) * 6.28
    freqs = torch.polar(torch.ones_like(angles), angles)
    ours = rotate(x, torch.view_as_real(freqs))
    torch.testing.assert_close(ours, _complex_rotation(x, freqs), rtol=1e-6, atol=1e-6)
    x16 = x.to(torch.bfloat16)  # bf16 in, bf16 out, float32 inside as diffusers does
    ours16 = rotate(x16, torch.view_as_real(freqs))
    assert ours16.dtype == torch.bfloat16
    assert torch.equal(ours16, _complex_rotation(x16, freqs))


def test_real_rope_leaves_the_image_unchanged(make_engine: Callable[..., TurboEngine]) -> None:
    reference = make_engine(real_rope=False)
    patched = make_engine(real_rope=True)
    processors = {
        type(m.processor).__name__
        for m in patched.pipeline.transformer.modules()
        if hasattr(m, "processor")
    }
    assert processors == {"TurboAttnProcessor"}
    assert use_real_rope(patched.pipeline.transformer) == 0  # idempotent
    assert patched.pipeline.text_encoder.config.use_cache is False  # no KV cache to fill
    spec = GenerationSpec("a lighthouse at dusk", seed=11, width=SIZE, height=SIZE)
    with torch.inference_mode():
        probe = torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
        caps, _ = reference._encode_prompts([spec])
        t = torch.tensor([0.5])
        ref_out = reference.pipeline.transformer([probe], t, caps, return_dict=False)[0][0]
        out = patched.pipeline.transformer([probe], t, caps, return_dict=False)[0][0]
    rel = float((out - ref_out).norm() / ref_out.norm())
    assert rel < 1e-5
    a = np.asarray(reference.generate([spec])[0].image, dtype=np.int16)
    b = np.asarray(patched.generate([spec])[0].image, dtype=np.int16)
    assert int(np.abs(a - b).max()) <= 1  # float32: at most a rounding flip of one level


def test_settings_reach_the_engine_config() -> None:
    settings = EngineSettings(real_rope=False, compile_text_encoder=False, compile_cache_dir="c")
    config = EngineConfig.from_settings(settings)
    assert (config.real_rope, config.compile_text_encoder, config.compile_cache_dir) == (
        False,
        False,
        "c",
    )
    assert EngineConfig.from_settings(EngineSettings()).compile_cache_dir is None


def test_compile_cache_dir_is_created_and_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    target = tmp_path / "cache"
    use_compile_cache(str(target))
    assert target.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(target.resolve())
    from torch._inductor.runtime import runtime_utils

    cache_dir: Any = getattr(runtime_utils, "cache_dir")  # noqa: B009 (not re-exported)
    assert cache_dir() == str(target.resolve())


def test_device_side_uint8_conversion_gives_diffusers_bytes(engine: TurboEngine) -> None:
    g = torch.Generator().manual_seed(5)
    # Values around the clamp edges and exact .5/255 ties: rounding must match numpy's.
    pixels = torch.rand(2, 3, 40, 24, generator=g) * 2.4 - 1.2
    pixels[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 2 * (0.5 / 255) - 1, 2 * (1.5 / 255) - 1])
    processor = engine.pipeline.image_processor
    for dtype in (torch.float32, torch.bfloat16):
        ours = to_pil(processor, pixels.to(dtype))
        theirs = processor.postprocess(pixels.to(dtype), output_type="pil")
        for a, b in zip(ours, theirs, strict=True):
            assert a.mode == b.mode == "RGB"
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_loaded_weights_need_no_gradient(engine: TurboEngine) -> None:
    # from_pretrained leaves requires_grad on; the compile cache keys include it, so a
    # model read from disk would miss graphs compiled for the same model built in memory.
    pipe = engine.pipeline
    for name in ("transformer", "text_encoder", "vae"):
        flags = {p.requires_grad for p in getattr(pipe, name).parameters()}
        assert flags == {False}, name


def test_uint8_images_reach_the_host_contiguous(engine: TurboEngine) -> None:
    # A permuted tensor keeps its strides through .cpu(); PIL then transposed it on the CPU.
    pixels = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    calls: list[bool] = []
    original = torch.Tensor.cpu

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(self.is_contiguous())
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cpu", spy)
        (image,) = to_pil(engine.pipeline.image_processor, pixels)
    assert calls == [True]
    assert image.size == (8, 16)
