"""Input images: hostile files are refused before they cost anything, odd but usable ones
are converted as documented, and grants are folders, not string prefixes."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image, ImageOps

from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.inputs.decode import InputLimits, check_mask_matches, load_image
from zimage_pipeline.inputs.grants import is_allowed
from zimage_pipeline.inputs.model import parse_grant
from zimage_pipeline.messages import ImageRef

LIMITS = InputLimits()


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: decoding
    it would allocate the claimed pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (bomb_png(50_000, 50_000), "claims more pixels than is safe to decode"),
        (bomb_png(5_000, 5_000), "5000x5000 is over the limit"),
        (b"certainly not an image", "not a PNG, JPEG or WebP image"),
        (saved(Image.new("RGB", (64, 64)), "PNG")[:60], "cannot be decoded"),
        (saved(Image.new("RGB", (64, 64)), "TIFF"), "not a PNG, JPEG or WebP image"),
        (saved(Image.new("RGB", (32, 64)), "PNG"), "sides must be at least 64"),
    ],
)
def test_hostile_files_are_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        load_image(data, limits=LIMITS, what="init_image")


def test_animated_files_are_refused() -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    for fmt in ("PNG", "WEBP"):
        data = saved(frames[0], fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(InvalidRequestError, match="animated or multi-frame"):
            load_image(data, limits=LIMITS, what="init_image")


def test_too_many_bytes_are_refused_before_decoding() -> None:
    data = saved(Image.effect_noise((64, 64), 80).convert("RGB"), "PNG")
    with pytest.raises(InvalidRequestError, match="more than 1000"):
        load_image(data, limits=InputLimits(max_bytes=1000), what="init_image")


def test_usable_odd_images_are_converted() -> None:
    cmyk = load_image(
        saved(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), limits=LIMITS, what="x"
    )
    assert cmyk.image.mode == "RGB" and cmyk.format == "jpeg"
    deep = Image.new("I;16", (64, 64), 65535)
    assert load_image(saved(deep, "PNG"), limits=LIMITS, what="x").image.getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent: composited on white
    assert load_image(saved(clear, "PNG"), limits=LIMITS, what="x").image.getpixel((0, 0)) == (
        255,
        255,
        255,
    )


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored landscape, shown portrait
    decoded = load_image(saved(image, "JPEG", exif=exif), limits=LIMITS, what="x")
    assert (decoded.width, decoded.height) == (64, 128)


def test_sizes_are_cropped_to_the_models_grid() -> None:
    decoded = load_image(saved(Image.new("RGB", (100, 70)), "PNG"), limits=LIMITS, what="x")
    assert (decoded.width, decoded.height) == (96, 64)


def test_a_mask_is_binary_white_is_repainted() -> None:
    grey = Image.new("L", (64, 64), 100)
    grey.paste(200, (0, 0, 64, 32))
    mask = load_image(saved(grey, "PNG"), limits=LIMITS, what="mask_image", mask=True)
    assert mask.image.mode == "L"
    assert (mask.image.getpixel((0, 0)), mask.image.getpixel((0, 63))) == (255, 0)


def test_a_mask_is_compared_with_its_image_before_the_crop() -> None:
    image = load_image(saved(Image.new("RGB", (1000, 1000)), "PNG"), limits=LIMITS, what="x")
    mask = load_image(
        saved(Image.new("L", (1001, 1001), 255), "PNG"), limits=LIMITS, what="m", mask=True
    )
    assert image.image.size == mask.image.size == (992, 992)  # the crop alone hides it
    with pytest.raises(
        InvalidRequestError,
        match=r"^mask_image: 1001x1001, the init image is 1000x1000: they must be the same size",
    ):
        check_mask_matches(image, mask)


def test_a_mask_is_compared_with_its_orientation_applied() -> None:
    image = load_image(saved(Image.new("RGB", (128, 64)), "PNG"), limits=LIMITS, what="x")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x128, shown 128x64 like the image
    stored = saved(Image.new("L", (64, 128), 255), "PNG", exif=exif)
    mask = load_image(stored, limits=LIMITS, what="m", mask=True)
    check_mask_matches(image, mask)  # the same size as shown: taken


def test_the_bomb_guard_leaves_the_process_warning_filters_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inputs are decoded in a thread pool: a guard that swaps the process-global warning
    filters (warnings.catch_warnings) races with every other thread doing the same."""
    during: list[list[Any]] = []
    transpose = ImageOps.exif_transpose

    def spying(image: Image.Image, **options: Any) -> Image.Image:
        during.append(list(warnings.filters))
        return transpose(image, **options)

    monkeypatch.setattr(ImageOps, "exif_transpose", spying)
    before = list(warnings.filters)
    load_image(saved(Image.new("RGB", (64, 64)), "PNG"), limits=LIMITS, what="x")
    assert during == [before] and warnings.filters == before


def test_pillows_warning_band_is_refused_whatever_the_filters_in_any_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 128x128 = 16384 pixels: over Pillow's limit, under twice it (Pillow only warns),
    # under ours; another thread's catch_warnings may have left "ignore" in force.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    data = saved(Image.new("RGB", (128, 128)), "PNG")

    def decode(_: int) -> str:
        try:
            load_image(data, limits=LIMITS, what="init_image")
        except InvalidRequestError as exc:
            return str(exc)
        return "decoded"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(4) as pool:
            answers = set(pool.map(decode, range(16)))
    assert answers == {
        "init_image: its header claims more pixels than is safe to decode (over 10000)"
    }


def test_only_the_taken_formats_decoders_see_a_clients_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hostile TIFF, PSD or EPS must not reach those parsers, not even to be identified."""
    Image.init()
    ran: list[str] = []
    for name, (factory, accept) in list(Image.OPEN.items()):

        def spy_factory(*args: Any, _name: str = name, _factory: Any = factory) -> Any:
            ran.append(_name)
            return _factory(*args)

        def spy_accept(prefix: bytes, _name: str = name, _accept: Any = accept) -> Any:
            ran.append(_name)
            return _accept(prefix) if _accept else True

        monkeypatch.setitem(Image.OPEN, name, (spy_factory, spy_accept))
    hostile = [saved(Image.new("RGB", (64, 64)), fmt) for fmt in ("TIFF", "BMP", "GIF", "PPM")]
    hostile += [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", b"8BPS" + bytes(40)]
    for data in hostile:
        with pytest.raises(InvalidRequestError, match="not a PNG, JPEG or WebP image"):
            load_image(data, limits=LIMITS, what="init_image")
    assert ran and set(ran) <= {"PNG", "JPEG", "WEBP"}
    for fmt in ("PNG", "JPEG", "WEBP"):  # the taken ones still open
        image = load_image(saved(Image.new("RGB", (64, 64)), fmt), limits=LIMITS, what="x")
        assert image.format == fmt.lower()


@pytest.mark.parametrize(
    ("grant", "key", "allowed"),
    [
        ("inputs/cms/", "cms/a.png", True),
        ("inputs/cms", "cms/a.png", True),
        ("inputs/cms", "cmsx/a.png", False),
        ("inputs/cms/", "other/cms/a.png", False),
        ("inputs", "anything/a.png", True),
        ("other/cms/", "cms/a.png", False),
    ],
)
def test_grants_are_folders(grant: str, key: str, allowed: bool) -> None:
    ref = ImageRef(bucket="inputs", key=key, sha256="0" * 64)
    assert is_allowed(ref, [parse_grant(grant)]) is allowed
