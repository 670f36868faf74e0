"""Provenance: XMP in PNG/JPEG/WebP without touching pixels; C2PA signed and verified."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr

from tests.c2pa_test_certs import SigningChain, make_chain, write_chain
from zimage_pipeline.errors import ConfigError
from zimage_pipeline.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    C2paSigningConfig,
    ProvenanceError,
    ProvenanceInfo,
    load_signing_config,
    mark_image,
    read_provenance,
)
from zimage_pipeline.provenance.containers import extract_xmp
from zimage_pipeline.settings import ProvenanceSettings

INFO = ProvenanceInfo(
    request_id="req-42",
    model_identity="Tongyi-MAI/Z-Image-Turbo@abc123",
    creator_tool="zimage-pipeline 0.1.0",
    image_index=1,
    seed=1234,
    created_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
)


def encode(fmt: str, *, mode: str = "RGB", lossless: bool = False) -> bytes:
    image = Image.new(mode, (48, 32))
    image.putdata([(x * 5 % 256, x * 3 % 256, 128, 200)[: len(mode)] for x in range(48 * 32)])
    buffer = io.BytesIO()
    if fmt == "webp":
        image.save(buffer, "WEBP", lossless=lossless, quality=80)
    else:
        image.save(buffer, fmt.upper())
    return buffer.getvalue()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.tobytes()


@pytest.fixture(scope="module")
def chain() -> SigningChain:
    return make_chain()


@pytest.fixture(scope="module")
def signing(chain: SigningChain) -> C2paSigningConfig:
    return C2paSigningConfig("es256", chain.chain_pem, SecretStr(chain.key_pem))


@pytest.mark.parametrize(
    ("fmt", "mode", "lossless"),
    [
        ("png", "RGB", False),
        ("jpeg", "RGB", False),
        ("webp", "RGB", False),  # VP8: promoted to VP8X
        ("webp", "RGBA", True),  # VP8L with alpha
    ],
)
def test_xmp_marks_every_format_without_touching_pixels(
    fmt: str, mode: str, lossless: bool
) -> None:
    original = encode(fmt, mode=mode, lossless=lossless)

    marked = mark_image(original, fmt, INFO)  # type: ignore[arg-type]

    assert pixels(marked) == pixels(original)
    report = read_provenance(marked)
    assert report.format == fmt
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.marked_as_ai and report.ok
    assert report.xmp["xmp:CreatorTool"] == "zimage-pipeline 0.1.0"
    assert report.xmp["zimage:RequestId"] == "req-42"
    assert report.xmp["zimage:Model"] == "Tongyi-MAI/Z-Image-Turbo@abc123"
    assert report.xmp["Iptc4xmpExt:AISystemUsed"] == "Tongyi-MAI/Z-Image-Turbo@abc123"
    assert report.xmp["xmp:CreateDate"] == "2026-11-21T12:00:00+00:00"
    assert report.xmp["zimage:Seed"] == "1234"
    assert not report.c2pa.present


def test_webp_alpha_flag_and_canvas_are_kept() -> None:
    marked = mark_image(encode("webp", mode="RGBA", lossless=True), "webp", INFO)
    with Image.open(io.BytesIO(marked)) as image:
        assert image.size == (48, 32)
        assert image.mode == "RGBA"
    assert marked[12:16] == b"VP8X"
    assert marked[20] & 0x04  # XMP flag
    assert marked[20] & 0x10  # alpha flag


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_marking_twice_replaces_the_packet(fmt: str) -> None:
    once = mark_image(encode(fmt), fmt, INFO)  # type: ignore[arg-type]
    other = ProvenanceInfo(request_id="req-43", model_identity="m", creator_tool="t")
    twice = mark_image(once, fmt, other)  # type: ignore[arg-type]
    assert twice.count(b"zimage:RequestId") == 1
    assert read_provenance(twice).xmp["zimage:RequestId"] == "req-43"


def test_values_are_xml_escaped() -> None:
    info = ProvenanceInfo(request_id='r"<&>', model_identity="m'<x>", creator_tool="t&t")
    report = read_provenance(mark_image(encode("png"), "png", info))
    assert report.xmp["zimage:RequestId"] == 'r"<&>'
    assert report.xmp["zimage:Model"] == "m'<x>"


def test_a_packet_with_a_dtd_is_refused() -> None:
    marked = mark_image(encode("png"), "png", INFO)
    packet = extract_xmp(marked)
    assert packet is not None
    evil = marked.replace(b"<x:xmpmeta", b'<!DOCTYPE x [<!ENTITY a "b">]><x:xmpmeta', 1)
    # The chunk CRC no longer matches, which our reader does not check; the DTD is the point.
    report = read_provenance(evil)
    assert report.xmp == {}
    assert report.xmp_error is not None and "DTD" in report.xmp_error
    assert not report.ok


def test_wrong_format_is_refused() -> None:
    with pytest.raises(ProvenanceError):
        mark_image(encode("jpeg"), "png", INFO)


def _tamper_png_pixels(data: bytes) -> bytes:
    """Change one pixel and re-pack the image data: a well-formed PNG with other pixels,
    every other chunk (the XMP and the C2PA manifest among them) left as it was."""
    pos, out = 8, [data[:8]]
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            raw = bytearray(zlib.decompress(body))
            raw[-1] ^= 0x55  # the last pixel byte (never a scanline filter byte)
            body = zlib.compress(bytes(raw))
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
        pos += 12 + length
    return b"".join(out)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_c2pa_manifest_is_signed_and_verifies(
    fmt: str, signing: C2paSigningConfig, chain: SigningChain
) -> None:
    original = encode(fmt)
    signed = mark_image(original, fmt, INFO, c2pa=signing)  # type: ignore[arg-type]

    assert pixels(signed) == pixels(original)
    report = read_provenance(signed)
    assert report.c2pa.present
    assert report.c2pa.verified, report.c2pa
    assert report.c2pa.validation_state == "Valid"  # signature fine, signer not in a trust list
    assert report.c2pa.actions == ("c2pa.created",)
    assert report.c2pa.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.c2pa.request == {
        "request_id": "req-42",
        "image_index": 1,
        "model": "Tongyi-MAI/Z-Image-Turbo@abc123",
    }
    assert report.c2pa.signer is not None and "zimage-pipeline test signer" in report.c2pa.signer
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA  # XMP survived signing
    assert report.ok

    trusted = read_provenance(signed, trust_anchors_pem=chain.root_pem)
    assert trusted.c2pa.trusted
    assert not read_provenance(signed, trust_anchors_pem=make_chain().root_pem).c2pa.trusted


def test_modified_png_fails_c2pa_verification(signing: C2paSigningConfig) -> None:
    signed = mark_image(encode("png"), "png", INFO, c2pa=signing)
    tampered = _tamper_png_pixels(signed)
    with Image.open(io.BytesIO(tampered)) as image:
        image.load()  # still a valid PNG: only the pixels changed

    report = read_provenance(tampered)

    assert report.c2pa.present
    assert not report.c2pa.verified
    assert report.c2pa.validation_state == "Invalid"
    assert any("assertion.dataHash.mismatch" in f for f in report.c2pa.failures), report.c2pa
    assert not report.ok


def test_modified_xmp_fails_c2pa_verification(signing: C2paSigningConfig) -> None:
    """The XMP is inside the C2PA hard binding: rewriting the mark is detected too."""
    signed = mark_image(encode("jpeg"), "jpeg", INFO, c2pa=signing)
    tampered = signed.replace(b"req-42", b"req-99", 1)
    assert not read_provenance(tampered).c2pa.verified


def test_signing_config_from_settings(tmp_path: Path, chain: SigningChain) -> None:
    chain_file, key_file, _ = write_chain(chain, tmp_path)
    settings = ProvenanceSettings(
        c2pa_enabled=True, c2pa_cert_chain_file=chain_file, c2pa_private_key_file=key_file
    )
    config = load_signing_config(settings)
    assert config is not None
    assert chain.key_pem not in repr(config)
    assert load_signing_config(ProvenanceSettings()) is None


def test_self_signed_certificate_is_refused_at_startup(tmp_path: Path, chain: SigningChain) -> None:
    # The root alone is self-signed and a CA: C2PA does not accept it as a signer.
    root_only = tmp_path / "root.pem"
    root_only.write_text(chain.root_pem)
    key_file = tmp_path / "k.pem"
    key_file.write_text(chain.key_pem)
    settings = ProvenanceSettings(
        c2pa_enabled=True, c2pa_cert_chain_file=root_only, c2pa_private_key_file=key_file
    )
    with pytest.raises(ConfigError) as info:
        load_signing_config(settings)
    assert "BEGIN" not in str(info.value)


def test_settings_require_signing_material() -> None:
    with pytest.raises(ValueError, match="c2pa_cert_chain_file"):
        ProvenanceSettings(c2pa_enabled=True)


def test_cli_shows_whether_the_signature_verifies(
    tmp_path: Path, signing: C2paSigningConfig, chain: SigningChain
) -> None:
    from typer.testing import CliRunner

    from zimage_pipeline.cli import app

    _, _, root_file = write_chain(chain, tmp_path)
    good = tmp_path / "good.png"
    good.write_bytes(mark_image(encode("png"), "png", INFO, c2pa=signing))
    bad = tmp_path / "bad.png"
    bad.write_bytes(_tamper_png_pixels(good.read_bytes()))
    runner = CliRunner()

    shown = runner.invoke(app, ["provenance", "show", str(good), "--trust-anchors", str(root_file)])
    assert shown.exit_code == 0, shown.output
    assert "C2PA: signature trusted (state Trusted)" in shown.output
    assert "digital source type: " + TRAINED_ALGORITHMIC_MEDIA in shown.output

    tampered = runner.invoke(app, ["provenance", "show", str(bad)])
    assert tampered.exit_code == 1
    assert "C2PA: signature DOES NOT VERIFY" in tampered.output
