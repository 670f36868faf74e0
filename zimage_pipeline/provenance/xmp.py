"""The XMP packet every image carries: IPTC digital source type, creator tool, request id."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # only on packets screened by _refuse_dtd
from datetime import UTC, datetime
from xml.sax.saxutils import quoteattr

from zimage_pipeline.provenance.errors import ProvenanceError

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
NAMESPACES = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "x": "adobe:ns:meta/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "dc": "http://purl.org/dc/elements/1.1/",
    "zimage": "urn:zimage-pipeline:xmp:1.0#",
}
_PREFIX_OF = {uri: prefix for prefix, uri in NAMESPACES.items()}


def build_packet(
    *,
    request_id: str,
    model_identity: str,
    creator_tool: str,
    created_at: datetime,
    image_index: int,
    seed: int | None,
) -> bytes:
    """A complete XMP packet (UTF-8). Values are XML-escaped attribute values."""
    fields = {
        "Iptc4xmpExt:DigitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
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
    declarations = " ".join(
        f"xmlns:{p}={quoteattr(NAMESPACES[p])}" for p in ("Iptc4xmpExt", "xmp", "zimage")
    )
    attributes = "\n    ".join(f"{name}={quoteattr(value)}" for name, value in fields.items())
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{NAMESPACES["x"]}">\n'
        f' <rdf:RDF xmlns:rdf="{NAMESPACES["rdf"]}">\n'
        f'  <rdf:Description rdf:about="" {declarations}\n    {attributes}/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )
    return text.encode("utf-8")


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
    child elements with text or a single rdf:li (what other tools often write).
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
            items = [li.text or "" for li in child.iter(f"{{{NAMESPACES['rdf']}}}li")]
            value = "; ".join(items) if items else (child.text or "").strip()
            resource = child.attrib.get(f"{{{NAMESPACES['rdf']}}}resource")
            fields[_name(child.tag)] = resource or value
    return fields
