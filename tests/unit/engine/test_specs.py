from __future__ import annotations

import pytest

from zimage_pipeline.engine import GenerationSpec, InvalidGenerationSpec
from zimage_pipeline.engine.batching import plan_batches
from zimage_pipeline.engine.types import MAX_SEED
from zimage_pipeline.errors import Disposition


def test_defaults_follow_the_model_card() -> None:
    spec = GenerationSpec("a fox", seed=1)
    assert (spec.width, spec.height, spec.steps, spec.guidance_scale) == (1024, 1024, 8, 0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 1000),  # not a multiple of 16
        ("height", 32),
        ("width", 8192),
        ("steps", 0),
        ("guidance_scale", -1.0),
        ("guidance_scale", float("nan")),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("prompt", "   "),
    ],
)
def test_parameters_the_model_cannot_take_are_rejected(field: str, value: object) -> None:
    options: dict[str, object] = {"prompt": "a fox", "seed": 1, field: value}
    with pytest.raises(InvalidGenerationSpec) as caught:
        GenerationSpec(**options)  # type: ignore[arg-type]
    assert caught.value.disposition is Disposition.REJECT
    assert field in str(caught.value)


def test_spec_like_objects_are_accepted() -> None:
    class Foreign:
        prompt = "a fox"
        negative_prompt = None
        width = 512
        height = 768
        steps = 8
        guidance_scale = 0.0
        seed = 42

    spec = GenerationSpec.of(Foreign())
    assert (spec.width, spec.height, spec.seed) == (512, 768, 42)


def test_batches_group_compatible_specs_and_respect_the_limit() -> None:
    big = [GenerationSpec(f"p{i}", seed=i, width=1024, height=1024) for i in range(5)]
    small = [GenerationSpec(f"q{i}", seed=i, width=512, height=512) for i in range(2)]
    cfg = GenerationSpec("r", seed=9, width=1024, height=1024, guidance_scale=4.0)
    specs = [big[0], small[0], big[1], cfg, big[2], big[3], small[1], big[4]]

    batches = plan_batches(specs, lambda spec: 2 if spec.width == 1024 else 4)

    assert batches == [[0, 2], [4, 5], [7], [1, 6], [3]]
    for batch in batches:
        assert len({specs[i].batch_key for i in batch}) == 1
