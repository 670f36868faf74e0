"""The lossy FP8 tier (engine.linear_fp8): off by default, and when on, the tiny model's
block projections are FP8 layers whose output stays near the bf16/float32 one.

Tolerances: e4m3 rounds each operand to 3 mantissa bits (relative error up to 2**-4),
so one layer's output is within a few percent of float32; the whole tiny transformer
(2 + 2 blocks) within 10 %. CPUs run the dequantized product (no FP8 GEMM there); the
GPU's FP8 GEMM is measured against eager diffusers by bench/turbo_bench.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.unit.engine.conftest import SIZE
from zimage_pipeline.engine import EngineConfig, GenerationSpec, TurboEngine
from zimage_pipeline.engine.fp8 import FP8_MAX, fp8_linear_class, quantize_linears, quantize_rows
from zimage_pipeline.settings import EngineSettings


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_off_by_default() -> None:
    assert EngineConfig(model_path="m").linear_fp8 is False
    assert EngineConfig.from_settings(EngineSettings()).linear_fp8 is False
    assert EngineConfig.from_settings(EngineSettings(linear_fp8=True)).linear_fp8 is True


def test_row_quantization_round_trips_within_e4m3_precision() -> None:
    values = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 3
    values[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(values)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    assert float(q.float().abs().max()) <= FP8_MAX
    assert torch.equal(back[5], torch.zeros(96))
    assert _rel(back, values) < 0.04


def test_fp8_linear_is_near_the_float_layer() -> None:
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        linear.bias.copy_(torch.randn(48, generator=g))
    layer = fp8_linear_class()(linear)
    x = torch.randn(2, 7, 64, generator=g)
    with torch.no_grad():
        out, ref = layer(x), linear(x)
    assert out.shape == (2, 7, 48)
    assert 1e-4 < _rel(out, ref) < 0.06  # lossy, but only by FP8 rounding


def test_engine_runs_the_blocks_in_fp8(make_engine: Callable[..., TurboEngine]) -> None:
    reference = make_engine(linear_fp8=False)
    engine = make_engine(linear_fp8=True)
    transformer = engine.pipeline.transformer
    fp8 = fp8_linear_class()
    kinds = {type(m).__name__ for m in transformer.modules() if isinstance(m, fp8 | nn.Linear)}
    assert "Fp8Linear" in kinds
    blocks = [m for m in transformer.modules() if type(m).__name__ == "ZImageTransformerBlock"]
    for block in blocks:  # every projection of attention and FFN, none left in float
        assert isinstance(block.attention.to_qkv, fp8)
        assert isinstance(block.attention.to_out[0], fp8)
        assert isinstance(block.feed_forward.w13, fp8) and isinstance(block.feed_forward.w2, fp8)
    assert quantize_linears(transformer) == 0  # idempotent
    spec = GenerationSpec("a lighthouse at dusk", seed=11, width=SIZE, height=SIZE)
    with torch.inference_mode():
        probe = torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
        caps, _ = reference._encode_prompts([spec])
        t = torch.tensor([0.5])
        ref_out = reference.pipeline.transformer([probe], t, caps, return_dict=False)[0][0]
        out = transformer([probe], t, caps, return_dict=False)[0][0]
    assert 1e-4 < _rel(out, ref_out) < 0.1
    [image] = engine.generate([spec])
    assert image.image.size == (SIZE, SIZE)
    # Its images say they are the lossy tier's, wherever the model identity goes.
    assert engine.identity.name == reference.identity.name + "+fp8-lossy"
    assert engine.identity.weights_sha256 == reference.identity.weights_sha256
