"""Image encoding, off the GPU thread: a pure function of the pixels and the options.

Pillow releases the GIL while it compresses, so a small thread pool encodes several
images at once while the GPU thread goes on with the next batch.
"""

from __future__ import annotations

import io
from typing import Any

from zimage_pipeline.engine.errors import InvalidGenerationSpec

_PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG", "jpg": "JPEG"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def encode_image(image: Any, *, format: str, quality: int = 90) -> bytes:
    """Encode an RGB image (PIL image or HxWx3 uint8 array) as png, webp or jpeg.

    ``quality`` (1-100) applies to webp and jpeg; png is lossless and ignores it. No
    metadata is written: provenance is embedded by the caller.
    """
    from PIL import Image

    name = str(format).lower()
    pil_format = _PIL_FORMATS.get(name)
    if pil_format is None:
        raise InvalidGenerationSpec(f"unsupported image format {format!r}: png, webp or jpeg")
    if not 1 <= quality <= 100:
        raise InvalidGenerationSpec(f"quality must be in [1, 100], got {quality}")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = io.BytesIO()
    if pil_format == "PNG":
        image.save(out, format="PNG", compress_level=6)
    elif pil_format == "WEBP":
        image.save(out, format="WEBP", quality=quality, method=4)
    else:
        image.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
