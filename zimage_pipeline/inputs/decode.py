"""Decode an input image safely, refusing hostile files before they cost anything.

Only Pillow's PNG, JPEG and WebP decoders ever run on a client's bytes: `Image.open` is
given those formats, so no other parser (TIFF, PSD, EPS, ...) sees them, not even to
identify them. Refused (INVALID_REQUEST naming the field): bytes over `max_bytes`;
anything that is not a PNG, JPEG or WebP image; a header claiming more than `max_pixels`
(or Pillow's own MAX_IMAGE_PIXELS, whichever is lower) or a side over `max_side` (read
from the header, before any pixel is decoded: decompression bombs); animated or
multi-frame files; a truncated or corrupt file; a side under 64 pixels after EXIF
orientation.
Converted, documented: EXIF orientation is applied; CMYK, 16-bit, palette and
grey-scale images become 8-bit RGB; an alpha channel is composited on white. A mask
becomes single-channel (L; an RGBA mask uses its alpha when the colour is uniform, else
its luminance) and is made binary at 128: white (255) is repainted, black kept. Sizes
that are not multiples of 16 are centre-cropped down to one (the model's grid), so the
output is at most 15 pixels smaller on a side than the input; a mask is compared with its
image at the decoded sizes, before that crop.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from zimage_pipeline.errors import InvalidRequestError

# Pillow's format names -> ours. The only decoders Image.open may run (see the docstring).
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_OPEN_FORMATS = tuple(FORMATS)
MIN_SIDE = 64
GRID = 16


@dataclass(frozen=True, slots=True)
class InputLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 4096


@dataclass(frozen=True, slots=True)
class DecodedImage:
    image: Image.Image  # RGB (an init image) or L, binary (a mask), cropped to the grid
    data: bytes  # as read: what its SHA-256 and the provenance ingredient are of
    sha256: str
    format: str  # png | jpeg | webp
    # The size as decoded (EXIF orientation applied), before the crop to the grid: what
    # a mask must match, since the crop would hide up to 15 pixels of difference.
    decoded_size: tuple[int, int]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def load_image(data: bytes, *, limits: InputLimits, what: str, mask: bool = False) -> DecodedImage:
    if len(data) > limits.max_bytes:
        raise InvalidRequestError(f"{what}: {len(data)} bytes, more than {limits.max_bytes}")
    # The bomb guard must not depend on the process's warning filters: inputs are decoded
    # in a thread pool, and `warnings.catch_warnings` swaps the process-global filter list
    # (two threads interleaving can leave one decoding with the other's filters, or leave
    # a filter behind for good). So no filter is touched: the header's width x height is
    # checked explicitly against the lower of our limit and Pillow's MAX_IMAGE_PIXELS
    # before `load()` (_checked_header), which refuses everything Pillow would only warn
    # about; Pillow's DecompressionBombError (over twice its limit, raised inside open) is
    # an exception of this thread and caught below, as is its warning should a process
    # filter ever make it one. A module lock was not needed, and would have serialised
    # every decode of the pool.
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as opened:
            fmt = _checked_header(opened, limits, what)
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard fired on the header, before any pixel was decoded.
        raise _too_many_pixels(what, limits) from None
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{what}: not a PNG, JPEG or WebP image") from None
    except Exception as exc:  # truncated, corrupt: Pillow raises many kinds
        raise InvalidRequestError(f"{what}: cannot be decoded ({type(exc).__name__})") from None
    decoded_size = image.size
    image = _as_mask(image) if mask else _as_rgb(image)
    image = _on_grid(image, what)
    return DecodedImage(image, data, hashlib.sha256(data).hexdigest(), fmt, decoded_size)


def _too_many_pixels(what: str, limits: InputLimits) -> InvalidRequestError:
    return InvalidRequestError(
        f"{what}: its header claims more pixels than is safe to decode "
        f"(over {_pixel_limit(limits)})"
    )


def _pixel_limit(limits: InputLimits) -> int:
    # Read at each call: MAX_IMAGE_PIXELS is Pillow's module setting (None: no limit).
    pillow = Image.MAX_IMAGE_PIXELS
    return limits.max_pixels if pillow is None else min(limits.max_pixels, pillow)


def _checked_header(opened: Image.Image, limits: InputLimits, what: str) -> str:
    fmt = FORMATS.get(opened.format or "")
    if fmt is None:  # Image.open was limited to FORMATS: a second line of defence
        allowed = ", ".join(FORMATS.values())
        raise InvalidRequestError(f"{what}: {opened.format or 'unknown'} is not one of {allowed}")
    width, height = opened.size
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise InvalidRequestError(
            f"{what}: {width}x{height} is over the limit ({limits.max_side} px a side, "
            f"{limits.max_pixels} pixels)"
        )
    if width * height > _pixel_limit(limits):
        raise _too_many_pixels(what, limits)
    if getattr(opened, "is_animated", False) or getattr(opened, "n_frames", 1) > 1:
        raise InvalidRequestError(f"{what}: animated or multi-frame images are not taken")
    return fmt


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits rather than clip at 255.
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


def _as_mask(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA"):
        colours: Any = image.convert("RGB").getextrema()  # ((min, max), ...) per band
        if all(low == high for low, high in colours):
            image = image.getchannel("A")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256)
    grey = image.convert("L")
    return grey.point(lambda value: 255 if value >= 128 else 0)


def _on_grid(image: Image.Image, what: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise InvalidRequestError(f"{what}: {width}x{height}, sides must be at least {MIN_SIDE}")
    target = (width - width % GRID, height - height % GRID)
    if target == (width, height):
        return image
    left, top = (width - target[0]) // 2, (height - target[1]) // 2
    return image.crop((left, top, left + target[0], top + target[1]))


def check_mask_matches(image: DecodedImage, mask: DecodedImage) -> None:
    """The mask and its image at their decoded sizes (orientation applied, before the crop
    to the grid: a 1001x1001 mask would otherwise pass for a 1000x1000 image)."""
    if image.decoded_size != mask.decoded_size:
        (mask_w, mask_h), (image_w, image_h) = mask.decoded_size, image.decoded_size
        raise InvalidRequestError(
            f"mask_image: {mask_w}x{mask_h}, the init image is {image_w}x{image_h}: "
            "they must be the same size"
        )
