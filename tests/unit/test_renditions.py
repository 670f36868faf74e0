"""The renditions post-processor: crop and fit geometry, formats, determinism, what a
request may ask for, and configuration errors that name their key."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from zimage_pipeline.decoding import decode_request
from zimage_pipeline.errors import ConfigError, InvalidRequestError
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins import renditions
from zimage_pipeline.plugins.api import SourceImage
from zimage_pipeline.plugins.registry import load_enabled
from zimage_pipeline.plugins.renditions import Plan, Preset, create, crop_box, plan

PRESETS: dict[str, Any] = {
    "master": {"width": 2048, "fit": "fit", "format": "png"},
    "social": {"width": 1200, "height": 628, "fit": "crop", "format": "jpeg"},
    "thumb": {"width": 400, "fit": "fit", "format": "webp"},
    "square": {"width": 256, "height": 256, "fit": "crop", "format": "avif", "quality": 60},
}
PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG", "avif": "AVIF"}


def request(**fields: Any) -> GenerationRequest:
    body = {"request_id": "r-1", "on_behalf_of": "alice", "prompt": "a lighthouse", **fields}
    return decode_request(json.dumps(body).encode())


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: which half a crop took shows in its pixels."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


def source(pixels: Image.Image, index: int = 0) -> SourceImage:
    buffer = io.BytesIO()
    pixels.save(buffer, "PNG")
    return SourceImage(
        index=index,
        pixels=pixels,
        data=buffer.getvalue(),
        format="png",
        width=pixels.width,
        height=pixels.height,
        seed=7,
        sha256="0" * 64,
    )


def preset(**fields: Any) -> Preset:
    return Preset.model_validate(fields)


# -- geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "aspect", "focal", "box"),
    [
        # a square source, a social crop: full width, the middle 536 rows
        ((1024, 1024), (1200, 628), (0.5, 0.5), (0, 244, 1024, 780)),
        # a focal point near the top or bottom edge: the box stops at the edge
        ((1024, 1024), (1200, 628), (0.5, 0.0), (0, 0, 1024, 536)),
        ((1024, 1024), (1200, 628), (0.5, 1.0), (0, 488, 1024, 1024)),
        ((1024, 1024), (1200, 628), (0.2, 0.3), (0, 39, 1024, 575)),
        # a wide source, a square crop: full height, around the focal column
        ((1600, 900), (1, 1), (0.5, 0.5), (350, 0, 1250, 900)),
        ((1600, 900), (1, 1), (0.3, 0.5), (30, 0, 930, 900)),
        ((1600, 900), (1, 1), (0.9, 0.5), (700, 0, 1600, 900)),
        ((1600, 900), (1, 1), (0.0, 0.0), (0, 0, 900, 900)),
        # the same aspect ratio: the whole image, whatever the focal point
        ((800, 400), (2, 1), (0.9, 0.9), (0, 0, 800, 400)),
    ],
)
def test_crop_box_is_the_largest_box_of_the_aspect_around_the_focal_point(
    size: tuple[int, int],
    aspect: tuple[int, int],
    focal: tuple[float, float],
    box: tuple[int, int, int, int],
) -> None:
    assert crop_box(size, aspect, focal) == box


@given(
    width=st.integers(1, 4096),
    height=st.integers(1, 4096),
    aspect_w=st.integers(1, 5000),
    aspect_h=st.integers(1, 5000),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
)
def test_crop_box_stays_inside_keeps_the_aspect_and_holds_the_focal_point(
    width: int, height: int, aspect_w: int, aspect_h: int, fx: float, fy: float
) -> None:
    left, top, right, bottom = crop_box((width, height), (aspect_w, aspect_h), (fx, fy))
    box_w, box_h = right - left, bottom - top
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    assert box_w == width or box_h == height  # as large as the image allows
    # the aspect ratio, up to rounding one side to whole pixels
    assert abs(box_w * aspect_h - box_h * aspect_w) <= max(aspect_w, aspect_h)
    assert left - 1 <= fx * width <= right + 1 and top - 1 <= fy * height <= bottom + 1


@pytest.mark.parametrize(
    ("source_size", "fields", "size"),
    [
        ((1024, 768), {"width": 400}, (400, 300)),
        ((1024, 768), {"height": 150}, (200, 150)),
        ((1024, 768), {"width": 400, "height": 400}, (400, 300)),
        ((768, 1024), {"width": 400, "height": 400}, (300, 400)),
        ((1024, 1024), {"width": 2048}, (2048, 2048)),
        ((1024, 1024), {"width": 2048, "upscale": False}, (1024, 1024)),
        ((1024, 1024), {"width": 400, "upscale": False}, (400, 400)),
        ((1000, 3), {"width": 10}, (10, 1)),  # never a zero-pixel side
    ],
)
def test_fit_keeps_the_aspect_inside_the_box(
    source_size: tuple[int, int], fields: dict[str, Any], size: tuple[int, int]
) -> None:
    target = plan(source_size, preset(fit="fit", format="png", **fields))
    assert target == Plan((0, 0, *source_size), size)


def test_crop_is_exactly_the_asked_size_and_upscales_unless_told_not_to() -> None:
    social = preset(width=1200, height=628, fit="crop", format="jpeg")
    assert plan((1024, 1024), social) == Plan((0, 244, 1024, 780), (1200, 628))
    no_upscale = preset(width=1200, height=628, fit="crop", format="jpeg", upscale=False)
    # the region itself: the right aspect ratio, never more pixels than the source has
    assert plan((1024, 1024), no_upscale) == Plan((0, 244, 1024, 780), (1024, 536))
    assert plan((2048, 2048), no_upscale).size == (1200, 628)


def test_the_focal_point_decides_which_part_a_crop_keeps() -> None:
    plugin = create(
        {"presets": {"sq": {"width": 64, "height": 64, "fit": "crop", "format": "png"}}}
    )
    wide = source(halves(256, 128))

    def colours(x: float) -> set[tuple[int, int, int]]:
        (made,) = plugin.process(request(renditions=["sq"], focal_point={"x": x, "y": 0.5}), [wide])
        with Image.open(io.BytesIO(made.data)) as image:
            return {image.getpixel((8, 32)), image.getpixel((56, 32))}

    assert colours(0.0) == {(255, 0, 0)}
    assert colours(1.0) == {(0, 0, 255)}
    assert colours(0.5) == {(255, 0, 0), (0, 0, 255)}


# -- images ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_format_decodes_back_at_its_size(name: str) -> None:
    plugin = create({"presets": PRESETS})
    (made,) = plugin.process(request(renditions=[name]), [source(halves(1024, 768), index=3)])
    expected = PRESETS[name]
    assert (made.source_index, made.name, made.format) == (3, name, expected["format"])
    with Image.open(io.BytesIO(made.data)) as image:
        assert image.format == PIL_FORMATS[expected["format"]]
        assert image.size == (made.width, made.height)
        assert image.mode == "RGB"
        assert "xmp" not in image.info  # unmarked: the worker adds provenance
    assert made.width == expected["width"]
    if expected["fit"] == "crop":
        assert made.height == expected["height"]
        assert made.details["focal_point"] == [0.5, 0.5]
    else:
        assert made.height == expected["width"] * 768 // 1024
        assert made.details["crop"] == [0, 0, 1024, 768]
    assert made.details["preset"] == name


def test_renditions_are_deterministic() -> None:
    image = Image.effect_mandelbrot((512, 384), (-2.0, -1.2, 1.0, 1.2), 64).convert("RGB")
    ask = request(renditions=sorted(PRESETS), focal_point={"x": 0.7, "y": 0.2})
    first = create({"presets": PRESETS}).process(ask, [source(image)])
    second = create({"presets": PRESETS}).process(ask, [source(image.copy())])
    assert [d.data for d in first] == [d.data for d in second]
    assert len({d.data for d in first}) == len(PRESETS)


def test_defaults_then_requested_once_each_for_every_image() -> None:
    plugin = create({"presets": PRESETS, "default": ["thumb", "master"]})
    images = [source(halves(64, 64), index=i) for i in range(2)]
    made = plugin.process(request(renditions=["social", "thumb", "social"]), images)
    assert [(d.source_index, d.name) for d in made] == [
        (i, name) for i in range(2) for name in ("thumb", "master", "social")
    ]


def test_no_presets_asked_and_no_defaults_make_nothing() -> None:
    assert create({"presets": PRESETS}).process(request(), [source(halves(64, 64))]) == []


def test_a_source_without_pil_pixels_is_decoded_from_its_bytes() -> None:
    plain = source(halves(128, 64))
    undecoded = SourceImage(0, None, plain.data, "png", 128, 64, 7, "0" * 64)
    plugin = create({"presets": PRESETS})
    ask = request(renditions=["thumb", "social"])
    assert plugin.process(ask, [undecoded]) == plugin.process(ask, [plain])


# -- what a request may ask ----------------------------------------------------------------


def test_an_unknown_preset_is_an_invalid_request_naming_it() -> None:
    plugin = create({"presets": {"thumb": PRESETS["thumb"], "social": PRESETS["social"]}})
    with pytest.raises(InvalidRequestError) as caught:
        plugin.validate_request(request(renditions=["thumb", "poster"]))
    assert caught.value.reason == "INVALID_REQUEST"
    assert str(caught.value) == "renditions: unknown preset 'poster' (configured: thumb, social)"
    with pytest.raises(InvalidRequestError, match="'poster'"):
        plugin.process(request(renditions=["poster"]), [source(halves(64, 64))])


def test_requests_may_not_name_presets_when_not_allowed() -> None:
    plugin = create({"presets": PRESETS, "default": ["thumb"], "allow_request": False})
    with pytest.raises(InvalidRequestError, match=r"cannot be requested.*'social'"):
        plugin.validate_request(request(renditions=["social"]))
    plugin.validate_request(request(renditions=["thumb"]))  # made anyway: nothing to refuse
    made = plugin.process(request(), [source(halves(64, 64))])
    assert [d.name for d in made] == ["thumb"]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"presets": {}}, "presets:"),
        ({"presets": {"thumb": {"fit": "fit", "format": "png"}}}, "presets.thumb: "),
        (
            {"presets": {"social": {"width": 1200, "fit": "crop", "format": "jpeg"}}},
            "presets.social: ",
        ),
        (
            {"presets": {"thumb": {"width": 4, "fit": "fit", "format": "gif"}}},
            "presets.thumb.format",
        ),
        (
            {"presets": {"thumb": {"width": 4, "fit": "fit", "format": "png", "quality": 0}}},
            "presets.thumb.quality",
        ),
        (
            {"presets": {"thumb": {"width": 4, "fit": "stretch", "format": "png"}}},
            "presets.thumb.fit",
        ),
        (
            {"presets": {"thumb": {"width": 0, "fit": "fit", "format": "png"}}},
            "presets.thumb.width",
        ),
        (
            {"presets": {"thumb": {"width": 4, "fit": "fit", "format": "png", "colour": "red"}}},
            "presets.thumb.colour",
        ),
        ({"presets": {"../x": PRESETS["thumb"]}}, "presets.../x"),
        ({"presets": PRESETS, "default": ["poster"]}, "default: "),
        ({"presets": PRESETS, "sizes": []}, "sizes"),
        ({"presets": PRESETS, "allow_request": "perhaps"}, "allow_request"),
    ],
)
def test_configuration_errors_name_the_key(config: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create(config)
    assert named in str(caught.value)


def test_the_registry_loads_it_by_name_without_its_enabled_flag() -> None:
    loaded = load_enabled({"renditions": {"enabled": True, "presets": PRESETS}})
    ((name, plugin),) = loaded.postprocessors
    assert name == "renditions" and isinstance(plugin, renditions.Renditions)
    assert set(plugin.presets) == set(PRESETS)


def test_avif_this_pillow_cannot_write_fails_at_startup_naming_the_preset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert renditions.codec_available("avif")  # what the rest of this file relies on
    monkeypatch.setattr(renditions, "codec_available", lambda fmt: fmt != "avif")
    with pytest.raises(ConfigError, match=r"presets\.square\.format: .*avif.*Pillow >= 11\.3"):
        create({"presets": PRESETS})
    without_avif = {k: v for k, v in PRESETS.items() if v["format"] != "avif"}
    assert set(create({"presets": without_avif}).presets) == set(without_avif)
