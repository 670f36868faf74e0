"""Keys of renditions: beside their image, under the request's prefix, built only from
checked segments."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from zimage_pipeline.storage import InvalidKeyError, image_key, request_prefix
from zimage_pipeline.storage.keys import rendition_key

WHEN = datetime(2026, 1, 2, 23, 30, tzinfo=UTC)


def test_a_rendition_lives_beside_its_image_under_the_request_prefix() -> None:
    key = rendition_key("zimage", WHEN, "cms:asset:42", 3, "social", "jpg")
    assert key == "zimage/2026/01/02/cms%3Aasset%3A42/3/social.jpg"
    assert key.startswith(request_prefix("zimage", WHEN, "cms:asset:42") + "/")
    assert rendition_key("", WHEN, "r", 0, "thumb-2_x", "avif") == "2026/01/02/r/0/thumb-2_x.avif"


def test_avif_is_an_image_extension() -> None:
    assert image_key("p", WHEN, "r", 1, "avif") == "p/2026/01/02/r/1.avif"


@pytest.mark.parametrize(
    ("index", "name", "ext"),
    [
        (0, "../audit", "png"),
        (0, "a/b", "png"),
        (0, "", "png"),
        (0, ".hidden", "png"),
        (0, "x" * 400, "png"),
        (0, "thumb", "jpeg"),  # renditions are stored as .jpg, one spelling only
        (0, "thumb", "gif"),
        (-1, "thumb", "png"),
        (True, "thumb", "png"),
    ],
)
def test_anything_that_is_no_safe_key_is_refused(index: int, name: str, ext: str) -> None:
    with pytest.raises(InvalidKeyError):
        rendition_key("zimage", WHEN, "r-1", index, name, ext)
