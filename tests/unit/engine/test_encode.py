from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zimage_pipeline.engine import InvalidGenerationSpec, encode_image

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(3)
    gradient = np.linspace(0, 255, 96 * 64 * 3).reshape(96, 64, 3)
    noise = rng.integers(0, 32, size=(96, 64, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_each_format_decodes_back_to_the_same_size(image: Image.Image, fmt: str) -> None:
    data = encode_image(image, format=fmt, quality=85)
    assert data.startswith(MAGIC[fmt])
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == image.size
    assert decoded.format == fmt.upper()


def test_png_is_lossless_and_arrays_are_accepted(image: Image.Image) -> None:
    data = encode_image(np.asarray(image), format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))


def test_quality_trades_size_for_fidelity(image: Image.Image) -> None:
    low, high = (len(encode_image(image, format="jpeg", quality=q)) for q in (20, 95))
    assert low < high


@pytest.mark.parametrize(("fmt", "quality"), [("gif", 90), ("png", 0), ("jpeg", 101)])
def test_bad_options_are_rejected(image: Image.Image, fmt: str, quality: int) -> None:
    with pytest.raises(InvalidGenerationSpec):
        encode_image(image, format=fmt, quality=quality)
