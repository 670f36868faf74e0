"""Provenance of derived images (renditions): the original's XMP fields plus a reference
to the original's SHA-256, XMP inside AVIF, and a C2PA manifest whose parent ingredient is
the original, its own manifest included."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from tests.c2pa_test_certs import SigningChain, make_chain
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.messages import ImageFormat
from zimage_pipeline.plugins.api import DerivedImage
from zimage_pipeline.ports import EncodedImage, ModelIdentity
from zimage_pipeline.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    C2paSigningConfig,
    ProvenanceError,
    ProvenanceInfo,
    edit_actions,
    mark_derived,
    mark_image,
    read_provenance,
)
from zimage_pipeline.provenance import avif as avif_container
from zimage_pipeline.provenance.c2pa_manifest import manifest_json
from zimage_pipeline.provenance.containers import extract_xmp
from zimage_pipeline.provenance.xmp import NAMESPACES, build_packet, parse_packet
from zimage_pipeline.wiring.outputs import ProvenanceEncoder

INFO = ProvenanceInfo(
    request_id="req-42",
    model_identity="Tongyi-MAI/Z-Image-Turbo@abc123",
    creator_tool="zimage-pipeline 0.1.0",
    image_index=1,
    seed=1234,
    created_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
)
FORMATS = ["png", "jpeg", "webp", "avif"]
PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}


def encode(fmt: str, size: tuple[int, int] = (48, 32), mode: str = "RGB") -> bytes:
    image = Image.new(mode, size)
    image.putdata(
        [(x * 5 % 256, x * 3 % 256, 128, 200)[: len(mode)] for x in range(size[0] * size[1])]
    )
    buffer = io.BytesIO()
    image.save(buffer, PIL_NAMES[fmt])
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


def original(signing: C2paSigningConfig | None = None) -> bytes:
    return mark_image(encode("png", (96, 64)), "png", INFO, c2pa=signing)


# -- XMP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_derived_image_names_its_source_by_digest(fmt: str) -> None:
    parent = original()
    unmarked = encode(fmt)

    marked = mark_derived(unmarked, fmt, INFO, parent=parent, parent_format="png", name="thumb")  # type: ignore[arg-type]

    assert pixels(marked) == pixels(unmarked)
    report = read_provenance(marked)
    source = read_provenance(parent)
    digest = hashlib.sha256(parent).hexdigest()
    assert report.format == fmt
    assert report.xmp["zimage:SourceSha256"] == digest
    assert report.xmp["xmpMM:DerivedFrom/stRef:instanceID"] == f"nih:sha-256;{digest}"
    assert report.xmp["zimage:Rendition"] == "thumb"
    assert report.digital_source_type == source.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    for field in ("zimage:RequestId", "zimage:ImageIndex", "zimage:Seed", "xmp:CreateDate"):
        assert report.xmp[field] == source.xmp[field]
    assert report.ok and not report.c2pa.present


def test_an_original_packet_names_no_source() -> None:
    fields = read_provenance(original()).xmp
    assert fields["zimage:RequestId"] == "req-42"
    derived_only = ("zimage:SourceSha256", "zimage:Rendition", "xmpMM:")
    assert not [name for name in fields if name.startswith(derived_only)]


def test_a_struct_written_as_attributes_is_read_too() -> None:
    """Other tools write a struct's fields as attributes of its element."""
    packet = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{NAMESPACES["rdf"]}">'
        f'<rdf:Description rdf:about="" xmlns:xmpMM="{NAMESPACES["xmpMM"]}"'
        f' xmlns:stRef="{NAMESPACES["stRef"]}">'
        '<xmpMM:DerivedFrom stRef:instanceID="nih:sha-256;cd" stRef:documentID="doc-1"/>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    assert parse_packet(packet) == {
        "xmpMM:DerivedFrom/stRef:instanceID": "nih:sha-256;cd",
        "xmpMM:DerivedFrom/stRef:documentID": "doc-1",
    }


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ProvenanceError, match="gif"):
        mark_derived(encode("png"), "gif", INFO, parent=original(), parent_format="png", name="x")  # type: ignore[arg-type]


# -- XMP inside AVIF -----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "size"), [("RGB", (48, 32)), ("RGBA", (33, 17))])
def test_avif_xmp_is_read_back_by_libavif_and_pixels_are_untouched(
    mode: str, size: tuple[int, int]
) -> None:
    unmarked = encode("avif", size, mode)
    packet = build_packet(
        request_id="req-1",
        model_identity="m",
        creator_tool="t",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        image_index=0,
        seed=1,
    )
    marked = avif_container.embed(unmarked, packet)
    assert avif_container.extract(unmarked) is None
    assert extract_xmp(marked) == packet
    with Image.open(io.BytesIO(marked)) as image, Image.open(io.BytesIO(unmarked)) as before:
        assert image.info["xmp"] == packet  # an independent reader (libavif) finds it
        assert (image.mode, image.size) == (before.mode, before.size)
        assert image.tobytes() == before.tobytes()


def test_avif_xmp_written_by_libavif_is_read() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "AVIF", xmp=b"<x:xmpmeta>theirs</x:xmpmeta>")
    assert extract_xmp(buffer.getvalue()) == b"<x:xmpmeta>theirs</x:xmpmeta>"


def test_avif_with_xmp_already_is_refused_rather_than_marked_twice() -> None:
    once = avif_container.embed(encode("avif"), b"<x:xmpmeta>one</x:xmpmeta>")
    with pytest.raises(ProvenanceError, match="already carries"):
        avif_container.embed(once, b"<x:xmpmeta>two</x:xmpmeta>")


def test_bytes_that_are_not_avif_are_refused() -> None:
    with pytest.raises(ProvenanceError, match="not avif"):
        mark_derived(encode("png"), "avif", INFO, parent=original(), parent_format="png", name="x")
    assert not avif_container.is_avif(encode("png"))


# -- C2PA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_derived_manifest_verifies_with_the_original_as_parent(
    fmt: str, signing: C2paSigningConfig, chain: SigningChain
) -> None:
    parent = original(signing)
    unmarked = encode(fmt)

    marked = mark_derived(
        unmarked,
        fmt,  # type: ignore[arg-type]
        INFO,
        parent=parent,
        parent_format="png",
        name="thumb",
        edits=("c2pa.resized", "c2pa.converted"),
        c2pa=signing,
    )

    assert pixels(marked) == pixels(unmarked)
    report = read_provenance(marked, trust_anchors_pem=chain.root_pem)
    assert report.c2pa.trusted, report.c2pa
    assert report.ok and report.c2pa.failures == ()
    assert report.c2pa.actions == ("c2pa.opened", "c2pa.resized", "c2pa.converted")
    assert report.c2pa.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.c2pa.ingredients == (
        {
            "title": "req-42-1.png",
            "relationship": "parentOf",
            "format": "image/png",
            "has_manifest": True,
        },
    )
    assert report.c2pa.request == {
        "request_id": "req-42",
        "image_index": 1,
        "model": "Tongyi-MAI/Z-Image-Turbo@abc123",
        "rendition": "thumb",
    }
    assert report.xmp["zimage:SourceSha256"] == hashlib.sha256(parent).hexdigest()
    # The ingredient carries the original's own manifest: the chain reaches generation.
    assert _ingredient_manifest(marked, fmt) == _active_manifest(parent, "png")


def _store(data: bytes, fmt: str) -> dict[str, Any]:
    text = manifest_json(data, fmt)
    assert text is not None
    return dict(json.loads(text))


def _active_manifest(data: bytes, fmt: str) -> str:
    return str(_store(data, fmt)["active_manifest"])


def _ingredient_manifest(data: bytes, fmt: str) -> str:
    store = _store(data, fmt)
    (ingredient,) = store["manifests"][store["active_manifest"]]["ingredients"]
    return str(ingredient["active_manifest"])


def test_rewriting_the_avif_xmp_breaks_the_signature(signing: C2paSigningConfig) -> None:
    """The XMP item, appended by us, is inside the C2PA hard binding like the pixels."""
    signed = mark_derived(
        encode("avif"),
        "avif",
        INFO,
        parent=original(signing),
        parent_format="png",
        name="t",
        c2pa=signing,
    )
    assert read_provenance(signed).c2pa.verified
    # The last occurrence: the manifest (a uuid box after ftyp) names the request too.
    at = signed.rindex(b'zimage:RequestId="req-42"')
    tampered = signed[:at] + signed[at:].replace(b"req-42", b"req-99", 1)
    assert read_provenance(tampered).xmp["zimage:RequestId"] == "req-99"
    assert not read_provenance(tampered).c2pa.verified


# -- which edits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crop", "size", "fmt", "edits"),
    [
        ([0, 0, 1024, 1024], (400, 400), "png", ("c2pa.resized",)),
        (None, (400, 400), "webp", ("c2pa.resized", "c2pa.converted")),
        (
            [0, 244, 1024, 780],
            (1200, 628),
            "jpeg",
            ("c2pa.cropped", "c2pa.resized", "c2pa.converted"),
        ),
        ([0, 244, 1024, 780], (1024, 536), "png", ("c2pa.cropped",)),
        (None, (1024, 1024), "png", ("c2pa.edited",)),  # same size and format: drawn on?
    ],
)
def test_edit_actions_say_what_changed(
    crop: list[int] | None, size: tuple[int, int], fmt: str, edits: tuple[str, ...]
) -> None:
    found = edit_actions(
        source_size=(1024, 1024), crop=crop, size=size, source_format="png", format=fmt
    )
    assert found == edits


# -- the Encoder port ----------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [[0, 16, 96, 48], "not a box", [0, 16, 96], None])
def test_the_encoder_marks_a_plugins_image_as_derived_from_its_source(
    crop: Any, signing: C2paSigningConfig
) -> None:
    request = decode_request(
        json.dumps({"request_id": "req-42", "on_behalf_of": "alice", "prompt": "p"}).encode()
    )
    source = EncodedImage(original(signing), ImageFormat.PNG, 96, 64, 1234)
    derived = DerivedImage(2, "social", encode("jpeg", (48, 16)), "jpeg", 48, 16, {"crop": crop})
    encoder = ProvenanceEncoder(creator_tool="zimage-pipeline", c2pa=signing)

    marked = encoder.mark_derived(
        derived,
        source=source,
        request=request,
        model=ModelIdentity("Tongyi-MAI/Z-Image-Turbo", "abc123", None),
        created_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        plugin="renditions",
    )

    assert (marked.source_index, marked.name, marked.format) == (2, "social", "jpeg")
    assert (marked.width, marked.height, marked.plugin) == (48, 16, "renditions")
    assert marked.details == {"crop": crop}
    report = read_provenance(marked.data)
    assert report.xmp["zimage:SourceSha256"] == hashlib.sha256(source.data).hexdigest()
    assert report.xmp["zimage:ImageIndex"] == "2" and report.xmp["zimage:Seed"] == "1234"
    assert report.c2pa.verified
    cropped = crop == [0, 16, 96, 48]  # a box of the plugin's in the shape we know
    expected = ["c2pa.opened", *(["c2pa.cropped"] if cropped else []), "c2pa.resized"]
    assert list(report.c2pa.actions) == [*expected, "c2pa.converted"]
