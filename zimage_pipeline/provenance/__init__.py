"""Provenance inside every image: IPTC/XMP always, a signed C2PA manifest when configured.

EU AI Act Art. 50(2) asks for a machine-readable mark that an image is AI-generated.
Every image gets an XMP packet with the IPTC digital source type
`trainedAlgorithmicMedia`, the creator tool and the request id. With
`provenance.c2pa_enabled`, a C2PA manifest (`c2pa.created`, same source type) is signed
over the marked file, so the XMP is covered by the C2PA hard binding too.

An image derived from a generated one (a rendition: another size, crop or format) gets
the same XMP fields plus a reference to its source's SHA-256 (`mark_derived`), and its
C2PA manifest has the source as parent ingredient, the source's own manifest included.

The worker calls `mark_image` and `mark_derived` off the GPU thread; `read_provenance`
backs `zimage-pipeline provenance show FILE`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from zimage_pipeline.provenance import c2pa_manifest
from zimage_pipeline.provenance.c2pa_manifest import (
    C2paReport,
    C2paSigningConfig,
    Input,
    Parent,
    load_signing_config,
)
from zimage_pipeline.provenance.containers import detect_format, embed_xmp, extract_xmp
from zimage_pipeline.provenance.errors import ProvenanceError
from zimage_pipeline.provenance.xmp import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    build_packet,
    parse_packet,
)

ImageFormat = Literal["png", "webp", "jpeg"]
DerivedFormat = Literal["png", "webp", "jpeg", "avif"]

__all__ = [
    "COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA",
    "TRAINED_ALGORITHMIC_MEDIA",
    "C2paReport",
    "C2paSigningConfig",
    "DerivedFormat",
    "ImageFormat",
    "Input",
    "ProvenanceError",
    "ProvenanceInfo",
    "ProvenanceReport",
    "edit_actions",
    "load_signing_config",
    "mark_derived",
    "mark_image",
    "read_provenance",
]


@dataclass(frozen=True, slots=True)
class ProvenanceInfo:
    request_id: str
    model_identity: str  # e.g. "Tongyi-MAI/Z-Image-Turbo@<revision>"
    creator_tool: str  # product and version, e.g. "zimage-pipeline 0.1.0"
    image_index: int = 0
    seed: int | None = None
    created_at: datetime | None = None  # default: now (UTC)
    # The template the image was made from (results.template_record), or None.
    template: Mapping[str, Any] | None = None
    # The images the model was given (image-to-image, inpainting): the init image first.
    inputs: tuple[Input, ...] = ()


@dataclass(frozen=True, slots=True)
class ProvenanceReport:
    format: str | None
    xmp: dict[str, str] = field(default_factory=dict)
    c2pa: C2paReport = field(default_factory=lambda: C2paReport(present=False))
    xmp_error: str | None = None

    @property
    def digital_source_type(self) -> str | None:
        return self.xmp.get("Iptc4xmpExt:DigitalSourceType")

    @property
    def marked_as_ai(self) -> bool:
        """Made by the model: generated, or edited by it from an input."""
        return self.digital_source_type in (
            TRAINED_ALGORITHMIC_MEDIA,
            COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
        )

    @property
    def ok(self) -> bool:
        """Marked as AI-generated, and any C2PA manifest present verifies."""
        return self.marked_as_ai and (not self.c2pa.present or self.c2pa.verified)

    def to_dict(self) -> dict[str, Any]:
        c2pa = asdict(self.c2pa)
        c2pa.update(verified=self.c2pa.verified, trusted=self.c2pa.trusted)
        return {
            "format": self.format,
            "marked_as_ai": self.marked_as_ai,
            "ok": self.ok,
            "xmp": self.xmp,
            "xmp_error": self.xmp_error,
            "c2pa": c2pa,
        }


def mark_image(
    data: bytes,
    fmt: ImageFormat,
    info: ProvenanceInfo,
    *,
    c2pa: C2paSigningConfig | None = None,
) -> bytes:
    """Return `data` with XMP provenance embedded and, given a signing config, a C2PA
    manifest signed over the result. Raises ProvenanceError (FAIL) on any failure:
    an unmarked image must never be stored."""
    if fmt not in ("png", "webp", "jpeg"):
        raise ProvenanceError(f"unsupported image format {fmt!r}")
    marked = embed_xmp(data, fmt, _packet(info))
    if c2pa is None:
        return marked
    return c2pa_manifest.sign(
        marked,
        fmt,
        title=f"{info.request_id}-{info.image_index}.{fmt}",
        creator_tool=info.creator_tool,
        model_identity=info.model_identity,
        request=_claimed_request(info),
        config=c2pa,
        inputs=info.inputs,
    )


def _packet(info: ProvenanceInfo, **derived: str) -> bytes:
    """The XMP packet of `info`; `derived` (source_sha256, rendition) for a rendition."""
    return build_packet(
        request_id=info.request_id,
        model_identity=info.model_identity,
        creator_tool=info.creator_tool,
        created_at=info.created_at or datetime.now(UTC),
        image_index=info.image_index,
        seed=info.seed,
        template=info.template,
        inputs={i.role: hashlib.sha256(i.data).hexdigest() for i in info.inputs} or None,
        **derived,
    )


def _claimed_request(info: ProvenanceInfo, **extra: str) -> dict[str, Any]:
    """What the C2PA manifest says about the request that made the image."""
    return {
        "request_id": info.request_id,
        "image_index": info.image_index,
        "model": info.model_identity,
        **({"template": dict(info.template)} if info.template else {}),
        **extra,
    }


def mark_derived(
    data: bytes,
    fmt: DerivedFormat,
    info: ProvenanceInfo,
    *,
    parent: bytes,
    parent_format: DerivedFormat,
    name: str,
    edits: Sequence[str] = ("c2pa.edited",),
    c2pa: C2paSigningConfig | None = None,
) -> bytes:
    """Return `data`, an image made from `parent` (the marked original, as stored) and
    called `name`, with the original's XMP fields plus a reference to `parent`'s SHA-256
    and, given a signing config, a C2PA manifest with `parent` as its parent ingredient
    and `edits` (C2PA action names, see `edit_actions`) as what was done to it.
    `info.image_index` is the parent's index. Raises ProvenanceError on any failure."""
    for value in (fmt, parent_format):
        if value not in get_args(DerivedFormat):
            raise ProvenanceError(f"unsupported image format {value!r}")
    packet = _packet(info, source_sha256=hashlib.sha256(parent).hexdigest(), rendition=name)
    marked = embed_xmp(data, fmt, packet)
    if c2pa is None:
        return marked
    original = f"{info.request_id}-{info.image_index}"
    return c2pa_manifest.sign(
        marked,
        fmt,
        title=f"{original}-{name}.{fmt}",
        creator_tool=info.creator_tool,
        model_identity=info.model_identity,
        request=_claimed_request(info, rendition=name),
        config=c2pa,
        parent=Parent(parent, parent_format, f"{original}.{parent_format}"),
        edits=edits,
    )


def edit_actions(
    *,
    source_size: tuple[int, int],
    crop: Sequence[int] | None,
    size: tuple[int, int],
    source_format: str,
    format: str,
) -> tuple[str, ...]:
    """The C2PA actions that turn a source into its derived image: `c2pa.cropped` when
    `crop` (left, top, right, bottom) is less than the whole source, `c2pa.resized` when
    the result's size differs from the (cropped) region's, `c2pa.converted` when the
    format changes; `c2pa.edited` when none of these says what happened (a plugin that
    draws on the image at the same size)."""
    width, height = source_size
    box = tuple(crop) if crop is not None else (0, 0, width, height)
    actions = []
    if box != (0, 0, width, height):
        actions.append("c2pa.cropped")
    if size != (box[2] - box[0], box[3] - box[1]):
        actions.append("c2pa.resized")
    if format != source_format:
        actions.append("c2pa.converted")
    return tuple(actions) or ("c2pa.edited",)


def read_provenance(
    source: Path | str | bytes, *, trust_anchors_pem: str | None = None
) -> ProvenanceReport:
    """What an image says about itself: its XMP fields and its C2PA manifest's status."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    fmt = detect_format(data)
    xmp: dict[str, str] = {}
    xmp_error = None
    try:
        packet = extract_xmp(data)
        if packet is not None:
            xmp = parse_packet(packet)
    except ProvenanceError as exc:
        xmp_error = str(exc)
    report = c2pa_manifest.verify(data, fmt, trust_anchors_pem=trust_anchors_pem)
    return ProvenanceReport(format=fmt, xmp=xmp, c2pa=report, xmp_error=xmp_error)
