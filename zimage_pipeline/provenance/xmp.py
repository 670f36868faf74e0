"""The XMP packet every image carries: IPTC digital source type, creator tool, request id.

An image derived from another (a rendition) carries the same fields, and names its
source: `xmpMM:DerivedFrom` (a ResourceRef whose `stRef:instanceID` is the source's
SHA-256 as an RFC 6920 `nih:sha-256;<hex>` URI), with `zimage:SourceSha256` (the bare hex
digest, as the result event and the audit record list it) and `zimage:Rendition` (its
name) beside it.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET  # only on packets screened by _refuse_dtd
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from zimage_pipeline.provenance.errors import ProvenanceError

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# An image edited by the model from an input (image-to-image, inpainting).
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)
NAMESPACES = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "x": "adobe:ns:meta/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "dc": "http://purl.org/dc/elements/1.1/",
    "zimage": "urn:zimage-pipeline:xmp:1.0#",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "stRef": "http://ns.adobe.com/xap/1.0/sType/ResourceRef#",
}
_PARSE_TYPE = f"{{{NAMESPACES['rdf']}}}parseType"
_PREFIX_OF = {uri: prefix for prefix, uri in NAMESPACES.items()}


def build_packet(
    *,
    request_id: str,
    model_identity: str,
    creator_tool: str,
    created_at: datetime,
    image_index: int,
    seed: int | None,
    source_sha256: str | None = None,
    rendition: str | None = None,
    template: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
) -> bytes:
    """A complete XMP packet (UTF-8). Values are XML-escaped attribute values.

    `source_sha256` (hex) and `rendition`: the packet of an image derived from the one
    whose bytes have that digest, under that name."""
    fields = {
        "Iptc4xmpExt:DigitalSourceType": (
            COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if inputs else TRAINED_ALGORITHMIC_MEDIA
        ),
        # IPTC 2025.1 generative-AI properties: which system made the image.
        "Iptc4xmpExt:AISystemUsed": model_identity,
        "xmp:CreatorTool": creator_tool,
        "xmp:CreateDate": created_at.astimezone(UTC).isoformat(timespec="seconds"),
        "zimage:RequestId": request_id,
        "zimage:ImageIndex": str(image_index),
        "zimage:Model": model_identity,
    }
    if seed is not None:
        fields["zimage:Seed"] = str(seed)
    for role, sha256 in sorted((inputs or {}).items()):  # init_image, mask: their SHA-256
        fields[f"zimage:Input_{role}_Sha256"] = sha256
    if template:
        fields["zimage:Template"] = str(template["id"])
        fields["zimage:TemplateVersion"] = str(template["version"])
        fields["zimage:TemplateSha256"] = str(template["sha256"])
        fields["zimage:TemplateVariables"] = json.dumps(
            template["variables"], sort_keys=True, ensure_ascii=False
        )
    prefixes = ["Iptc4xmpExt", "xmp", "zimage"]
    body = "/>"  # an original's packet: its bytes as they always were
    if source_sha256 is not None:
        fields["zimage:SourceSha256"] = source_sha256
        fields["zimage:Rendition"] = rendition or ""
        prefixes += ["xmpMM", "stRef"]
        body = f">\n{_derived_from(source_sha256)}  </rdf:Description>"
    declarations = " ".join(f"xmlns:{p}={quoteattr(NAMESPACES[p])}" for p in prefixes)
    attributes = "\n    ".join(f"{name}={quoteattr(value)}" for name, value in fields.items())
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{NAMESPACES["x"]}">\n'
        f' <rdf:RDF xmlns:rdf="{NAMESPACES["rdf"]}">\n'
        f'  <rdf:Description rdf:about="" {declarations}\n    {attributes}{body}\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )
    return text.encode("utf-8")


def _derived_from(source_sha256: str) -> str:
    """The `xmpMM:DerivedFrom` struct naming the source by its digest."""
    instance = escape(f"nih:sha-256;{source_sha256}")
    return (
        '   <xmpMM:DerivedFrom rdf:parseType="Resource">\n'
        f"    <stRef:instanceID>{instance}</stRef:instanceID>\n"
        "   </xmpMM:DerivedFrom>\n"
    )


def _refuse_dtd(packet: bytes) -> None:
    # XMP never needs a DTD; refusing one keeps entity expansion attacks out of the parser.
    upper = packet.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        raise ProvenanceError("XMP packet with a DTD refused")


def _name(tag: str) -> str:
    if tag.startswith("{"):
        uri, local = tag[1:].split("}", 1)
        prefix = _PREFIX_OF.get(uri)
        return f"{prefix}:{local}" if prefix else tag
    return tag


def parse_packet(packet: bytes) -> dict[str, str]:
    """Simple properties of every rdf:Description, as `prefix:Name` -> value.

    Both serialisations are read: properties as attributes (what we write) and as
    child elements with text or a single rdf:li (what other tools often write). The
    fields of a struct (`rdf:parseType="Resource"`, or written as attributes of its
    element) are read as `prefix:Struct/prefix:Field`.
    """
    _refuse_dtd(packet)
    text = packet.decode("utf-8", errors="replace").lstrip("\ufeff")
    start = text.find("<x:xmpmeta")
    end = text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        start, end = text.find("<rdf:RDF"), text.rfind("</rdf:RDF>")
        closing = "</rdf:RDF>"
    else:
        closing = "</x:xmpmeta>"
    if start < 0 or end < 0:
        raise ProvenanceError("no XMP metadata in packet")
    try:
        root = ET.fromstring(text[start : end + len(closing)])  # noqa: S314 - DTD refused above
    except ET.ParseError as exc:
        raise ProvenanceError(f"unreadable XMP: {exc}") from exc
    fields: dict[str, str] = {}
    for description in root.iter(f"{{{NAMESPACES['rdf']}}}Description"):
        for attr, value in description.attrib.items():
            if not attr.startswith(f"{{{NAMESPACES['rdf']}}}"):
                fields[_name(attr)] = value
        for child in description:
            struct = _struct_fields(child)
            if struct:
                fields.update((f"{_name(child.tag)}/{k}", v) for k, v in struct.items())
                continue
            items = [li.text or "" for li in child.iter(f"{{{NAMESPACES['rdf']}}}li")]
            value = "; ".join(items) if items else (child.text or "").strip()
            resource = child.attrib.get(f"{{{NAMESPACES['rdf']}}}resource")
            fields[_name(child.tag)] = resource or value
    return fields


def _struct_fields(element: ET.Element) -> dict[str, str]:
    """The fields of a struct property, empty if `element` is not one."""
    # rdf:* and xml:lang attributes are syntax, not fields.
    syntax = (f"{{{NAMESPACES['rdf']}}}", "{http://www.w3.org/XML/1998/namespace}")
    fields = {_name(k): v for k, v in element.attrib.items() if not k.startswith(syntax)}
    if element.attrib.get(_PARSE_TYPE) == "Resource":
        fields.update((_name(f.tag), (f.text or "").strip()) for f in element)
    return fields
