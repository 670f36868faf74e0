"""The engine's own prompt encoding gives diffusers' embeddings.

Reference: ``ZImagePipeline.encode_prompt`` with its default 512-token padding and mask.
float32 on the CPU: the causal encoder makes padding and the mask irrelevant for the real
tokens, so only summation order (other matrix shapes) may differ: 1e-5 relative.
The CUDA graph capture itself needs a GPU (the benchmark runs it); here its fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.unit.engine.conftest import SIZE
from zimage_pipeline.engine import EngineConfig, GenerationSpec, TurboEngine
from zimage_pipeline.engine.prompts import MAX_SEQUENCE_LENGTH, PromptEncoder, bucketed
from zimage_pipeline.errors import ConfigError

PROMPTS = ["a fox", "a much longer prompt about a lighthouse at dusk, gulls", "a fox"]


def _diffusers(engine: TurboEngine, texts: list[str]) -> list[torch.Tensor]:
    with torch.inference_mode():
        embeds, _ = engine.pipeline.encode_prompt(
            prompt=list(texts),
            device=engine.device,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    return list(embeds)


def _assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_bucketed_lengths() -> None:
    assert [bucketed(n, 32) for n in (1, 32, 33, 119, 500, 512)] == [32, 32, 64, 128, 512, 512]
    assert bucketed(119, 1) == 119
    assert bucketed(500, 48) == 512  # never past the truncation length


@pytest.mark.parametrize("bucket", [1, 32, 200])
def test_bucketed_encoding_equals_diffusers(engine: TurboEngine, bucket: int) -> None:
    encoder = PromptEncoder(engine.pipeline, engine.device, bucket=bucket, graphs=True)
    assert encoder.use_graphs is False  # the CPU has no CUDA graphs
    with torch.inference_mode():
        ours = encoder.encode(PROMPTS)
    _assert_same(ours, _diffusers(engine, PROMPTS))
    assert ours[0] is ours[2]  # equal prompts are encoded once
    assert encoder.graph_count == 0


def test_long_prompts_are_truncated_at_512_tokens_as_diffusers_does(engine: TurboEngine) -> None:
    # The tiny tokenizer makes one token per byte: 700 bytes are past the limit.
    texts = ["snow " * 140, "a fox"]
    encoder = PromptEncoder(engine.pipeline, engine.device, bucket=32, graphs=False)
    with torch.inference_mode():
        ours = encoder.encode(texts)
    assert ours[0].shape[0] == MAX_SEQUENCE_LENGTH
    _assert_same(ours, _diffusers(engine, texts))


def test_a_failed_capture_falls_back_to_eager_with_the_same_result(engine: TurboEngine) -> None:
    encoder = PromptEncoder(engine.pipeline, engine.device, bucket=32, graphs=False)
    encoder.use_graphs = True  # as on a GPU; capturing on the CPU raises inside _capture
    with torch.inference_mode():
        ours = encoder.encode(PROMPTS)
    assert encoder.use_graphs is False
    assert encoder.graph_error
    assert encoder.graph_count == 0
    _assert_same(ours, _diffusers(engine, PROMPTS))


def test_engine_encodes_positive_and_negative_prompts_in_one_call(engine: TurboEngine) -> None:
    assert engine.prompt_encoder is not None  # on by default
    batch = [
        GenerationSpec(p, seed=1, width=SIZE, height=SIZE, guidance_scale=4.0, negative_prompt=n)
        for p, n in (("a fox", "blurry"), ("a cat", None))
    ]
    with torch.inference_mode():
        positive, negative = engine._encode_prompts(batch)
    _assert_same(positive, _diffusers(engine, ["a fox", "a cat"]))
    _assert_same(negative, _diffusers(engine, ["blurry", ""]))


def test_the_diffusers_path_remains_available(make_engine: Callable[..., TurboEngine]) -> None:
    engine = make_engine(text_encoder_graphs=False)
    assert engine.prompt_encoder is None
    batch = [GenerationSpec(p, seed=1, width=SIZE, height=SIZE) for p in PROMPTS]
    with torch.inference_mode():
        ours, _ = engine._encode_prompts(batch)
    _assert_same(ours, _diffusers(engine, PROMPTS))


def test_graphs_and_a_compiled_text_encoder_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        EngineConfig(model_path="m", text_encoder_graphs=True, compile_text_encoder=True)
    with pytest.raises(ConfigError, match="prompt_bucket"):
        EngineConfig(model_path="m", prompt_bucket=0)
    EngineConfig(model_path="m", text_encoder_graphs=False, compile_text_encoder=True)
