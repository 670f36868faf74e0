"""Image-to-image and inpainting on the loaded weights: no second copy, no dtype change,
deterministic, and batched only with their own kind."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from PIL import Image, ImageDraw

from tests.unit.engine.test_engine import FakeOutOfMemory
from zimage_pipeline.engine import TurboEngine
from zimage_pipeline.engine.errors import InvalidGenerationSpec
from zimage_pipeline.engine.types import GenerationSpec

SIZE = 64


def init_image() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(20, 20, 220))
    return image


def mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, SIZE, SIZE // 2), fill=255)  # repaint the top
    return mask


def spec(task: str, seed: int = 7, **fields: object) -> GenerationSpec:
    options: dict[str, object] = {"width": SIZE, "height": SIZE, "steps": 2, "task": task}
    if task != "text_to_image":
        options["init_image"] = init_image()
    if task == "inpaint":
        options["mask_image"] = mask()
    options.update(fields)
    return GenerationSpec("a red room with a blue ball", seed=seed, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("task", ["image_to_image", "inpaint"])
def test_task_pipelines_share_the_loaded_weights_in_their_dtype(
    make_engine: Callable[..., TurboEngine], task: str
) -> None:
    engine = make_engine()
    base = engine.pipeline
    base.transformer.to(torch.bfloat16)  # a dtype from_pipe would silently cast away
    dtypes = {
        name: module.dtype for name, module in base.components.items() if hasattr(module, "dtype")
    }
    built = engine.task_pipeline(task)
    for name in ("transformer", "vae", "text_encoder"):
        assert getattr(built, name) is getattr(base, name), name  # the same module, no copy
    after = {
        name: module.dtype for name, module in base.components.items() if hasattr(module, "dtype")
    }
    assert after == dtypes  # from_pipe changed no component's dtype
    assert engine.task_pipeline(task) is built  # built once


@pytest.mark.parametrize("task", ["image_to_image", "inpaint"])
def test_each_task_is_deterministic_and_keeps_the_size(engine: TurboEngine, task: str) -> None:
    first = engine.generate([spec(task)])[0]
    again = engine.generate([spec(task)])[0]
    other = engine.generate([spec(task, seed=8)])[0]
    assert first.image.size == (SIZE, SIZE)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.image.tobytes() != other.image.tobytes()


def region_difference(a: Image.Image, b: Image.Image, box: tuple[int, int, int, int]) -> float:
    pairs = zip(a.crop(box).getdata(), b.crop(box).getdata(), strict=True)
    total = sum(abs(x - y) for p, q in pairs for x, y in zip(p, q, strict=True))
    return total / ((box[2] - box[0]) * (box[3] - box[1]))


def test_inpainting_repaints_only_under_the_mask(engine: TurboEngine) -> None:
    """Two seeds: the repainted top half differs, the kept bottom half (away from the
    mask's edge, where the decoder blends) stays what the init image made it."""
    first = engine.generate([spec("inpaint", seed=1, strength=1.0)])[0].image
    second = engine.generate([spec("inpaint", seed=2, strength=1.0)])[0].image
    top, bottom = (0, 0, SIZE, SIZE // 2 - 8), (0, SIZE // 2 + 16, SIZE, SIZE)
    assert region_difference(first, second, top) > 4 * region_difference(first, second, bottom)


def test_tasks_batch_only_with_their_own_kind(engine: TurboEngine) -> None:
    specs = [spec("text_to_image"), spec("image_to_image"), spec("text_to_image", seed=9)]
    assert len({s.batch_key for s in specs}) == 2
    images = engine.generate(specs)
    assert [i.seed for i in images] == [7, 7, 9]
    alone = engine.generate([spec("image_to_image")])[0]
    assert images[1].image.tobytes() == alone.image.tobytes()  # batching changes nothing


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"task": "image_to_image", "init_image": None}, "takes an init image"),
        ({"task": "inpaint", "mask_image": None}, "takes a mask"),
        ({"task": "image_to_image", "strength": 0.0}, "strength must be in"),
        ({"task": "image_to_image", "init_image": Image.new("RGB", (32, 32))}, "not the spec's"),
        ({"task": "outpaint"}, "task must be one of"),
    ],
)
def test_a_task_without_its_inputs_is_refused(fields: dict[str, object], problem: str) -> None:
    task = str(fields.get("task"))
    base: dict[str, object] = {"width": SIZE, "height": SIZE}
    if task in ("image_to_image", "inpaint"):
        base["init_image"] = init_image()
    if task == "inpaint":
        base["mask_image"] = mask()
    with pytest.raises(InvalidGenerationSpec, match=problem):
        GenerationSpec("p", seed=1, **{**base, **fields})  # type: ignore[arg-type]


def other_init_image(shade: int) -> Image.Image:
    image = init_image()
    ImageDraw.Draw(image).rectangle((0, 0, SIZE // 4, SIZE // 4), fill=(shade, shade, 0))
    return image


@pytest.mark.parametrize("task", ["image_to_image", "inpaint"])
def test_out_of_memory_splits_an_image_task_batch_keeping_each_its_own_inputs(
    make_engine: Callable[..., TurboEngine], monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    """Three requests with different init images, halved down to one at a time: each
    image still comes from its own init image and seed (the inputs are split with the
    specs, not shifted), and equals the image made alone."""
    engine = make_engine(max_batch=4)
    specs = [spec(task, seed=s, init_image=other_init_image(40 * s)) for s in (1, 2, 3)]
    alone = [engine.generate([one])[0].image.tobytes() for one in specs]
    fake = FakeOutOfMemory(engine, fits=1)
    monkeypatch.setattr(engine.pipeline.transformer, "forward", fake)

    images = engine.generate(specs)

    assert max(fake.batches) > 1  # it did try them together first
    assert [i.seed for i in images] == [1, 2, 3]
    assert [i.oom_splits for i in images] == [2, 2, 1]
    assert [i.image.tobytes() for i in images] == alone
