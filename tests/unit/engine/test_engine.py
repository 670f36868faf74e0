"""The engine on the tiny model: the real loader, pipeline and VAE, on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.engine.conftest import SIZE
from zimage_pipeline.engine import (
    DeviceFailure,
    GenerationFailed,
    GenerationSpec,
    GpuOutOfMemory,
    TurboEngine,
)
from zimage_pipeline.errors import Disposition


def spec(prompt: str = "a red fox in fresh snow", seed: int = 7, **kw: Any) -> GenerationSpec:
    options: dict[str, Any] = {"width": SIZE, "height": SIZE} | kw
    return GenerationSpec(prompt, seed=seed, **options)


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_loads_the_tiny_model_in_float32_on_the_cpu(engine: TurboEngine) -> None:
    assert engine.device.type == "cpu"
    assert engine.pipeline.transformer.dtype == torch.float32
    assert type(engine.pipeline).__name__ == "ZImagePipeline"
    assert len(engine.identity.weights_sha256) == 64
    assert engine.identity.source == "local"


def test_generates_an_rgb_image_of_the_asked_size_and_records_the_seed(
    engine: TurboEngine,
) -> None:
    [image] = engine.generate([spec(seed=1234, width=SIZE, height=2 * SIZE)])
    assert image.image.mode == "RGB"
    assert image.image.size == (SIZE, 2 * SIZE)
    assert (image.seed, image.width, image.height, image.steps) == (1234, SIZE, 2 * SIZE, 8)
    assert image.timings.batch_size == 1
    assert image.timings.total_s >= image.timings.denoise_s > 0
    assert pixels(image.image).std() > 0  # not a blank image


def test_same_seed_same_image_other_seed_other_image(engine: TurboEngine) -> None:
    first, again, other = (engine.generate([spec(seed=s)])[0] for s in (5, 5, 6))
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert np.abs(pixels(first.image) - pixels(other.image)).mean() > 1.0


def test_a_batch_gives_the_images_each_spec_gives_alone(engine: TurboEngine) -> None:
    # Prompts of different lengths: the batch pads captions and masks attention.
    specs = [
        spec("a fox", seed=1),
        spec("a lighthouse on a cliff at dusk with long shadows and gulls", seed=2),
        spec("a fox", seed=3),
    ]
    batched = engine.generate(specs)
    assert [image.timings.batch_size for image in batched] == [3, 3, 3]
    for one, image in zip(specs, batched, strict=True):
        [alone] = engine.generate([one])
        assert image.seed == one.seed
        difference = np.abs(pixels(image.image) - pixels(alone.image))
        assert difference.max() <= 2, "batching changed an image beyond float rounding"


def test_incompatible_specs_are_split_and_results_keep_the_callers_order(
    engine: TurboEngine,
) -> None:
    specs = [spec(seed=1), spec(seed=2, width=2 * SIZE), spec(seed=3), spec(seed=4, steps=2)]
    images = engine.generate(specs)
    assert [(i.seed, i.width, i.steps) for i in images] == [
        (1, SIZE, 8),
        (2, 2 * SIZE, 8),
        (3, SIZE, 8),
        (4, SIZE, 2),
    ]
    assert [i.timings.batch_size for i in images] == [2, 1, 2, 1]


def test_classifier_free_guidance_uses_the_negative_prompt(engine: TurboEngine) -> None:
    plain = engine.generate([spec(seed=3, guidance_scale=3.0)])[0]
    negative = engine.generate([spec(seed=3, guidance_scale=3.0, negative_prompt="blurry")])[0]
    assert np.abs(pixels(plain.image) - pixels(negative.image)).mean() > 0.1


def test_steps_count_transformer_forwards_exactly(
    engine: TurboEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers 0.42.1: num_inference_steps=N is N forwards, none wasted on sigma 0."""
    transformer = engine.pipeline.transformer
    calls: list[int] = []
    original = transformer.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", counting)
    engine.generate([spec(steps=8)])
    assert len(calls) == 8


def test_prompts_are_encoded_without_padding_to_512_and_unchanged(engine: TurboEngine) -> None:
    batch = [spec("a fox"), spec("a much longer prompt about a lighthouse at dusk", seed=2)]
    with torch.inference_mode():
        ours, _ = engine._encode_prompts(batch)
        padded, _ = engine.pipeline.encode_prompt(
            prompt=[s.prompt for s in batch],
            device=engine.device,
            do_classifier_free_guidance=False,
            max_sequence_length=512,
        )
    for mine, reference in zip(ours, padded, strict=True):
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


class FakeOutOfMemory:
    """Makes the transformer raise CUDA's OOM for batches larger than ``fits``."""

    def __init__(self, engine: TurboEngine, fits: int) -> None:
        self.fits = fits
        self.batches: list[int] = []
        self._original = engine.pipeline.transformer.forward

    def __call__(self, x: list[Any], *args: Any, **kwargs: Any) -> Any:
        self.batches.append(len(x))
        if len(x) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return self._original(x, *args, **kwargs)


def test_out_of_memory_halves_the_batch_and_remembers_the_limit(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(max_batch=4)
    specs = [spec(seed=s) for s in (11, 12, 13)]
    expected = [engine.generate([one])[0] for one in specs]
    fake = FakeOutOfMemory(engine, fits=1)
    monkeypatch.setattr(engine.pipeline.transformer, "forward", fake)

    images = engine.generate(specs)

    assert [i.seed for i in images] == [11, 12, 13]
    assert [i.oom_splits for i in images] == [2, 2, 1]  # 3 -> 2 + 1 -> (1 + 1) + 1
    for image, alone in zip(images, expected, strict=True):
        assert np.array_equal(pixels(image.image), pixels(alone.image))
    fake.batches.clear()
    engine.generate(specs)
    assert set(fake.batches) == {1}, "the next call starts from the lowered batch size"


def test_out_of_memory_at_batch_one_fails_only_that_call(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    monkeypatch.setattr(engine.pipeline.transformer, "forward", FakeOutOfMemory(engine, fits=0))
    with pytest.raises(GpuOutOfMemory) as caught:
        engine.generate([spec(seed=1), spec(seed=2)])
    assert caught.value.disposition is Disposition.FAIL
    assert caught.value.reason == "GPU_OUT_OF_MEMORY"
    monkeypatch.undo()
    assert engine.generate([spec(seed=1)])[0].seed == 1, "the engine keeps serving"


def test_a_sticky_cuda_error_is_fatal_now_and_for_every_later_call(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.pipeline.transformer, "forward", broken)
    with pytest.raises(DeviceFailure) as caught:
        engine.generate([spec()])
    assert caught.value.disposition is Disposition.FATAL
    monkeypatch.undo()
    with pytest.raises(DeviceFailure):
        engine.generate([spec()])


def test_an_unexpected_error_fails_the_call_with_its_cause(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()

    def odd(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("shape mismatch in a custom layer")

    monkeypatch.setattr(engine.pipeline.transformer, "forward", odd)
    with pytest.raises(GenerationFailed) as caught:
        engine.generate([spec()])
    assert caught.value.disposition is Disposition.FAIL
    assert isinstance(caught.value.__cause__, ValueError)


def test_warmup_generates_before_the_first_request(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    fake = FakeOutOfMemory(engine, fits=99)  # counts batches, never fails
    monkeypatch.setattr(engine.pipeline.transformer, "forward", fake)
    seconds = engine.warmup(width=SIZE, height=SIZE)
    assert seconds > 0
    assert fake.batches == [1] * engine.default_steps  # compile off: one image is enough
