"""The demo's product packshot and its background mask, made here (no photo ships with
the project), and put where the policy lets `cms-publisher` reference input images."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image, ImageDraw

from zimage_pipeline.settings import Settings
from zimage_pipeline.storage import ObjectStore

# config/policy.toml's [inputs] grant for cms-publisher: "zimage-inputs/cms/".
INPUTS_BUCKET = "zimage-inputs"
CMS_FOLDER = "cms"
_PRODUCT = (32, 40, 96, 120)  # the product's ellipse on a 128x128 studio shot


def packshot() -> bytes:
    """A studio shot: a blue product on a light grey sweep."""
    image = Image.new("RGB", (128, 128), (240, 240, 240))
    ImageDraw.Draw(image).ellipse(_PRODUCT, fill=(30, 60, 200))
    return _png(image)


def background_mask() -> bytes:
    """White (repaint) everywhere but the product, which stays as photographed."""
    mask = Image.new("L", (128, 128), 255)
    ImageDraw.Draw(mask).ellipse(_PRODUCT, fill=0)
    return _png(mask)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def put_reference(store: ObjectStore, bucket: str, key: str, data: bytes) -> dict[str, Any]:
    """Upload `data` and return the request's reference to it (with its SHA-256)."""
    store.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")
    return {"bucket": bucket, "key": key, "sha256": hashlib.sha256(data).hexdigest()}


def stage_packshot(settings: Settings, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's packshot and mask in the CMS's input folder: the references to them."""
    store = ObjectStore(settings.storage)
    folder = f"{CMS_FOLDER}/{run_id}"
    photo = put_reference(store, INPUTS_BUCKET, f"{folder}/packshot.png", packshot())
    mask = put_reference(store, INPUTS_BUCKET, f"{folder}/packshot-mask.png", background_mask())
    return photo, mask
