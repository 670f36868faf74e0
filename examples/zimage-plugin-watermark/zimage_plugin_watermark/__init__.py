"""A post-processor that writes a text mark into a copy of each image."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import ImageDraw

from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins.api import DerivedImage, SourceImage

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


class Watermark:
    def __init__(self, text: str, corner: str) -> None:
        self.text = text
        self.corner = corner

    def process(
        self, request: GenerationRequest, images: Sequence[SourceImage]
    ) -> list[DerivedImage]:
        return [self._mark(image) for image in images]

    def _mark(self, image: SourceImage) -> DerivedImage:
        marked = image.pixels.convert("RGB").copy()  # never draw on the original
        draw = ImageDraw.Draw(marked)
        left, top, right, bottom = draw.textbbox((0, 0), self.text)
        width, height = right - left + 8, bottom - top + 8
        x = 4 if self.corner.endswith("left") else max(0, marked.width - width - 4)
        y = 4 if self.corner.startswith("top") else max(0, marked.height - height - 4)
        draw.rectangle((x, y, x + width, y + height), fill=(0, 0, 0))
        draw.text((x + 4 - left, y + 4 - top), self.text, fill=(255, 255, 255))
        buffer = io.BytesIO()
        marked.save(buffer, format="PNG")
        return DerivedImage(
            source_index=image.index,
            name="watermarked",
            data=buffer.getvalue(),
            format="png",
            width=marked.width,
            height=marked.height,
            details={"text": self.text, "corner": self.corner},
        )


def create(config: Mapping[str, Any]) -> Watermark:
    unknown = set(config) - {"text", "corner"}
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: text, corner")
    text = str(config.get("text", "preview"))
    corner = str(config.get("corner", "bottom-right"))
    if corner not in CORNERS:
        raise ValueError(f"corner: one of {', '.join(CORNERS)}, not {corner!r}")
    if not text or len(text) > 64:
        raise ValueError("text: 1 to 64 characters")
    return Watermark(text, corner)
