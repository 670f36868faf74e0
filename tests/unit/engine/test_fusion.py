"""Fused projections compute the unfused model: one GEMM per fused group, same dot products.

Tolerance as for the real RoPE: float32 on the CPU, so the whole forward agrees to 1e-5
relative (only summation order may differ), and the image to one level of 255.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tests.unit.engine.conftest import SIZE
from zimage_pipeline.engine import EngineConfig, GenerationSpec, Placement, TurboEngine
from zimage_pipeline.engine.attention import processor_class, restore_processor
from zimage_pipeline.engine.fusion import (
    fuse_projections,
    fused_feed_forward_class,
    unfuse_projections,
)
from zimage_pipeline.engine.rope import undo_real_rope
from zimage_pipeline.settings import EngineSettings

SPEC = GenerationSpec("a lighthouse at dusk", seed=11, width=SIZE, height=SIZE)


def _forward(engine: TurboEngine, caps: list[torch.Tensor]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=g)
    with torch.inference_mode():
        out = engine.pipeline.transformer([probe], torch.tensor([0.5]), caps, return_dict=False)
    result: torch.Tensor = out[0][0]
    return result


def _blocks(engine: TurboEngine) -> list[Any]:
    return [
        m
        for m in engine.pipeline.transformer.modules()
        if type(m).__name__ == "ZImageTransformerBlock"
    ]


def test_fused_blocks_have_one_projection_per_group_and_the_same_weights(
    make_engine: Callable[..., TurboEngine],
) -> None:
    plain = make_engine(fuse_projections=False)
    fused = make_engine(fuse_projections=True)
    blocks = _blocks(fused)
    assert len(blocks) == len(_blocks(plain)) > 0
    for block, reference in zip(blocks, _blocks(plain), strict=True):
        attn, ref_attn = block.attention, reference.attention
        assert not hasattr(attn, "to_q") and not hasattr(attn, "to_k")
        expected = torch.cat([ref_attn.to_q.weight, ref_attn.to_k.weight, ref_attn.to_v.weight])
        assert torch.equal(attn.to_qkv.weight, expected)
        assert isinstance(block.feed_forward, fused_feed_forward_class())
        ff: Any = block.feed_forward
        ref_ff = reference.feed_forward
        assert torch.equal(ff.w13.weight, torch.cat([ref_ff.w1.weight, ref_ff.w3.weight]))
        assert torch.equal(ff.w2.weight, ref_ff.w2.weight)
    # The fused copy replaces the separate weights: no extra memory.
    count = sum(p.numel() for p in fused.pipeline.transformer.parameters())
    assert count == sum(p.numel() for p in plain.pipeline.transformer.parameters())
    assert fuse_projections(fused.pipeline.transformer) == 0  # idempotent


def test_fused_forward_and_image_equal_the_unfused_ones(
    make_engine: Callable[..., TurboEngine],
) -> None:
    for real_rope in (True, False):  # the processor rotates real and complex tables
        plain = make_engine(fuse_projections=False, real_rope=real_rope)
        fused = make_engine(fuse_projections=True, real_rope=real_rope)
        with torch.inference_mode():
            caps, _ = plain._encode_prompts([SPEC])
        ref = _forward(plain, caps)
        rel = float((_forward(fused, caps) - ref).norm() / ref.norm())
        assert 0 <= rel < 1e-5
    a = np.asarray(plain.generate([SPEC])[0].image, dtype=np.int16)
    b = np.asarray(fused.generate([SPEC])[0].image, dtype=np.int16)
    assert int(np.abs(a - b).max()) <= 1


def test_unfusing_gives_back_diffusers_modules_and_weights(
    make_engine: Callable[..., TurboEngine],
) -> None:
    plain = make_engine(fuse_projections=False, real_rope=False, text_encoder_graphs=False)
    engine = make_engine(fuse_projections=True, real_rope=True)
    transformer = engine.pipeline.transformer
    assert unfuse_projections(transformer) == len(_blocks(engine))
    undo_real_rope(transformer)
    assert restore_processor(transformer) == len(_blocks(engine))
    names = {type(m.processor).__name__ for m in transformer.modules() if hasattr(m, "processor")}
    assert names == {"ZSingleStreamAttnProcessor"}
    ours, theirs = transformer.state_dict(), plain.pipeline.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.inference_mode():
        caps, _ = plain._encode_prompts([SPEC])
    assert torch.equal(_forward(engine, caps), _forward(plain, caps))


def test_fusion_is_skipped_with_sequential_offload(
    make_engine: Callable[..., TurboEngine],
) -> None:
    # Offload hooks sit on each linear layer; fused layers would have none.
    engine = make_engine(memory_mode=Placement.SEQUENTIAL_OFFLOAD, fuse_projections=True)
    assert all(hasattr(b.attention, "to_q") for b in _blocks(engine))
    processors = {
        type(m.processor) for m in _blocks(engine)[0].modules() if hasattr(m, "processor")
    }
    assert processors == {processor_class()}  # real RoPE still installed it


def test_round_three_settings_reach_the_engine_config() -> None:
    settings = EngineSettings(
        fuse_projections=False, text_encoder_graphs=False, prompt_bucket=64, vae_decode_batch=4
    )
    config = EngineConfig.from_settings(settings)
    assert (
        config.fuse_projections,
        config.text_encoder_graphs,
        config.prompt_bucket,
        config.vae_decode_batch,
    ) == (False, False, 64, 4)
