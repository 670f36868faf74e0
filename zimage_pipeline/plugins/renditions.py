"""The renditions post-processor: other sizes, crops and formats of every generated image.

    [plugins.renditions]
    enabled = true
    default = ["thumb"]          # made for every request
    allow_request = true         # a request's `renditions` may name further presets
    presets.master = { width = 2048, fit = "fit", format = "png" }
    presets.social = { width = 1200, height = 628, fit = "crop", format = "jpeg" }
    presets.thumb = { width = 400, fit = "fit", format = "webp", quality = 80 }

A preset gives a width, a height or both, and:

- `fit = "fit"`: keep the aspect ratio, as large as fits inside the box;
- `fit = "crop"`: exactly width x height: the largest region of that aspect ratio,
  centred on the request's `focal_point` (default: the middle) and moved back inside the
  image where the point lies near an edge, then resized;
- `format`: png, webp, jpeg or avif; `quality` (1-100, default 85) for the lossy ones;
- `upscale = false`: never larger than the source region (a crop keeps its aspect ratio
  and comes out smaller than asked instead).

Resizing uses Lanczos; encoding is deterministic (same source, same bytes). The plugin
returns unmarked images: the worker marks each with its source's provenance (XMP, and
C2PA with the source as parent ingredient) and stores it as `{index}/{preset}.{ext}`
beside the source. A request naming a preset that is not configured, or naming one at
all where `allow_request = false` (other than those made anyway), is rejected
INVALID_REQUEST before anything is charged (`validate_request`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, Literal, Self

from PIL import Image, features
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from zimage_pipeline.engine.encode import encode_image
from zimage_pipeline.errors import ConfigError, InvalidRequestError
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins.api import DerivedFormat, DerivedImage, SourceImage

MAX_SIDE = 8192  # a rendition's width or height: bounds the memory one preset can take
PresetName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
]
Format = DerivedFormat
# The Pillow feature each format's encoder needs.
_CODEC_FEATURES: dict[str, str] = {"png": "zlib", "webp": "webp", "jpeg": "jpg", "avif": "avif"}
CENTRE = (0.5, 0.5)


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int | None = Field(default=None, ge=1, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=1, le=MAX_SIDE)
    fit: Literal["crop", "fit"]
    format: Format
    quality: int = Field(default=85, ge=1, le=100)
    upscale: bool = True

    @model_validator(mode="after")
    def _has_a_box(self) -> Self:
        if self.width is None and self.height is None:
            raise ValueError("needs a width, a height or both")
        if self.fit == "crop" and (self.width is None or self.height is None):
            raise ValueError('fit = "crop" needs both width and height (the aspect ratio)')
        return self


class RenditionsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True  # the registry strips it before create(); accepted if given
    presets: dict[PresetName, Preset] = Field(min_length=1)
    default: list[PresetName] = Field(default_factory=list)
    allow_request: bool = True

    @field_validator("default")
    @classmethod
    def _defaults_are_presets(cls, value: list[str], info: ValidationInfo) -> list[str]:
        presets = info.data.get("presets")
        if presets is None:  # invalid itself: reported under its own key
            return value
        unknown = [name for name in value if name not in presets]
        if unknown:
            raise ValueError(
                f"unknown preset {_quoted(unknown)} (configured: {', '.join(presets)})"
            )
        return list(dict.fromkeys(value))


@dataclass(frozen=True, slots=True)
class Plan:
    """What one rendition of one source is: a region of the source and its new size."""

    box: tuple[int, int, int, int]  # left, top, right, bottom, in source pixels
    size: tuple[int, int]  # width, height of the rendition

    @property
    def box_size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def crop_box(
    source: tuple[int, int], aspect: tuple[int, int], focal: tuple[float, float] = CENTRE
) -> tuple[int, int, int, int]:
    """The largest box of aspect ratio `aspect` (width, height) inside `source`, centred
    on `focal` (fractions of the source's width and height) as far as the edges allow."""
    width, height = source
    aspect_w, aspect_h = aspect
    if width * aspect_h > aspect_w * height:  # the source is wider: keep its full height
        box_w, box_h = min(width, max(1, _div_round(height * aspect_w, aspect_h))), height
    else:
        box_w, box_h = width, min(height, max(1, _div_round(width * aspect_h, aspect_w)))
    left = _centred(box_w, width, focal[0])
    top = _centred(box_h, height, focal[1])
    return left, top, left + box_w, top + box_h


def _div_round(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, in integers (no float ties to differ)."""
    return (2 * numerator + denominator) // (2 * denominator)


def _centred(length: int, total: int, fraction: float) -> int:
    """Where a span of `length` starts to be centred on `fraction` of `total`, moved
    back inside [0, total] when the centre lies too near an edge."""
    start = round(fraction * total - length / 2)
    return min(max(start, 0), total - length)


def plan(source: tuple[int, int], preset: Preset, focal: tuple[float, float] = CENTRE) -> Plan:
    """The region of `source` a preset takes, and the size it comes out at."""
    if preset.fit == "crop":
        assert preset.width is not None and preset.height is not None  # the validator's
        box = crop_box(source, (preset.width, preset.height), focal)
        result = Plan(box, (preset.width, preset.height))
        region = result.box_size
        if not preset.upscale and (region[0] < preset.width or region[1] < preset.height):
            return Plan(box, region)  # the region itself: smaller, same aspect ratio
        return result
    scales = [Fraction(preset.width, source[0])] if preset.width else []
    scales += [Fraction(preset.height, source[1])] if preset.height else []
    scale = min(scales) if preset.upscale else min([*scales, Fraction(1)])
    size = (max(1, round(source[0] * scale)), max(1, round(source[1] * scale)))
    return Plan((0, 0, *source), size)


def render(pixels: Image.Image, target: Plan) -> Image.Image:
    """The region resized with Lanczos (or only cut out, when its size is already right)."""
    if target.size == target.box_size:
        return pixels.crop(target.box)
    return pixels.resize(target.size, Image.Resampling.LANCZOS, box=target.box)


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode without metadata (the worker adds provenance), the same bytes every time."""
    if fmt != "avif":
        return encode_image(image, format=fmt, quality=quality)
    out = io.BytesIO()
    # One encoder thread: libaom's output depends on its thread count, and a rendition
    # must come out the same on every host (a retry may run on another worker).
    image.convert("RGB").save(out, format="AVIF", quality=quality, speed=6, max_threads=1)
    return out.getvalue()


def codec_available(fmt: str) -> bool:
    """Whether the installed Pillow can write `fmt` (AVIF: Pillow >= 11.3 wheels)."""
    return bool(features.check(_CODEC_FEATURES[fmt]))


class Renditions:
    def __init__(self, config: RenditionsConfig) -> None:
        self._presets = dict(config.presets)
        self._default = list(config.default)
        self._allow_request = config.allow_request
        # Renditions of one request are made side by side (Pillow releases the GIL while
        # it resizes and encodes); the service already runs process() off the GPU thread.
        self._pool = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="zimage-renditions"
        )

    @property
    def presets(self) -> Mapping[str, Preset]:
        return self._presets

    def validate_request(self, request: GenerationRequest) -> None:
        """InvalidRequestError naming the preset(s) a request may not have."""
        self.selected(request)

    def selected(self, request: GenerationRequest) -> list[str]:
        """The presets made for `request`: the defaults, then the ones it names, once each."""
        asked = list(request.renditions)
        refused = [name for name in asked if name not in self._default]
        if refused and not self._allow_request:
            raise InvalidRequestError(
                f"renditions: presets cannot be requested here (asked for {_quoted(refused)})"
            )
        unknown = [name for name in asked if name not in self._presets]
        if unknown:
            raise InvalidRequestError(
                f"renditions: unknown preset {_quoted(unknown)} "
                f"(configured: {', '.join(self._presets)})"
            )
        return list(dict.fromkeys([*self._default, *asked]))

    def process(
        self, request: GenerationRequest, images: Sequence[SourceImage]
    ) -> list[DerivedImage]:
        names = self.selected(request)
        focal = (request.focal_point.x, request.focal_point.y) if request.focal_point else None
        # Each source decoded (if need be) once, before the threads share it read-only.
        sources = [(image.index, _pixels(image)) for image in images]
        jobs = [(index, pixels, name) for index, pixels in sources for name in names]

        def rendition(job: tuple[int, Image.Image, str]) -> DerivedImage:
            return self._rendition(job[0], job[1], job[2], focal)

        return list(self._pool.map(rendition, jobs))

    def _rendition(
        self, index: int, pixels: Image.Image, name: str, focal: tuple[float, float] | None
    ) -> DerivedImage:
        preset = self._presets[name]
        target = plan(pixels.size, preset, focal or CENTRE)
        details: dict[str, Any] = {"preset": name, "fit": preset.fit, "crop": list(target.box)}
        if preset.fit == "crop":
            details["focal_point"] = list(focal or CENTRE)
        return DerivedImage(
            source_index=index,
            name=name,
            data=encode(render(pixels, target), preset.format, preset.quality),
            format=preset.format,
            width=target.size[0],
            height=target.size[1],
            details=details,
        )


def _pixels(image: SourceImage) -> Image.Image:
    """The source as an RGB PIL image: its pixels, or its bytes decoded when a caller
    passed no PIL image."""
    pixels = image.pixels
    if not isinstance(pixels, Image.Image):
        with Image.open(io.BytesIO(image.data)) as decoded:
            return decoded.convert("RGB")
    if pixels.mode != "RGB":
        return pixels.convert("RGB")
    pixels.load()  # a lazily loaded image must not be loaded by two threads at once
    return pixels


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def create(config: Mapping[str, Any]) -> Renditions:
    """The entry point's factory: ConfigError naming the key for a bad table, or a
    format the installed Pillow cannot write (so `check` fails, not a request)."""
    try:
        parsed = RenditionsConfig.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_input=False)
        )
        raise ConfigError(problems) from None
    for name, preset in parsed.presets.items():
        if not codec_available(preset.format):
            raise ConfigError(
                f"presets.{name}.format: the installed Pillow cannot write {preset.format} "
                "(AVIF needs Pillow >= 11.3, whose wheels include libavif)"
            )
    return Renditions(parsed)
