"""XMP packets inside PNG, JPEG, WebP and AVIF files, written and read without re-encoding.

The encoded pixels are never touched: we only add (or replace) the one metadata block
each format defines for XMP, so marking is lossless and cheap.

- PNG: an iTXt chunk with keyword `XML:com.adobe.xmp`, right after IHDR.
- JPEG: an APP1 segment starting `http://ns.adobe.com/xap/1.0/\\0`, after SOI/APP0.
- WebP: an `XMP ` chunk, with the VP8X header's XMP flag set (a simple VP8/VP8L file
  is promoted to the extended format, as the WebP container spec requires).
- AVIF: a `mime` item of type `application/rdf+xml` (provenance/avif.py).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from zimage_pipeline.provenance import avif
from zimage_pipeline.provenance.errors import ProvenanceError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_XMP_KEYWORD = b"XML:com.adobe.xmp"
JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_WEBP_XMP_FLAG = 0x04
_WEBP_ALPHA_FLAG = 0x10


def detect_format(data: bytes) -> str | None:
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if avif.is_avif(data):
        return "avif"
    return None


def embed_xmp(data: bytes, fmt: str, packet: bytes) -> bytes:
    if detect_format(data) != fmt:
        raise ProvenanceError(f"image bytes are not {fmt}")
    if fmt == "png":
        return _png_embed(data, packet)
    if fmt == "jpeg":
        return _jpeg_embed(data, packet)
    if fmt == "avif":
        return avif.embed(data, packet)
    return _webp_embed(data, packet)


def extract_xmp(data: bytes) -> bytes | None:
    fmt = detect_format(data)
    if fmt == "png":
        return _png_extract(data)
    if fmt == "jpeg":
        return _jpeg_extract(data)
    if fmt == "webp":
        return _webp_extract(data)
    if fmt == "avif":
        return avif.extract(data)
    return None


# -- PNG ---------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ProvenanceError("truncated PNG chunk")
        yield kind, body
        pos += 12 + length
        if kind == b"IEND":
            return


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _is_png_xmp(kind: bytes, body: bytes) -> bool:
    return kind == b"iTXt" and body.startswith(PNG_XMP_KEYWORD + b"\x00")


def _png_embed(data: bytes, packet: bytes) -> bytes:
    # keyword, NUL, compression flag 0 + method 0, empty language tag and translated keyword
    itxt = png_chunk(b"iTXt", PNG_XMP_KEYWORD + b"\x00\x00\x00\x00\x00" + packet)
    out = [PNG_SIGNATURE]
    for kind, body in _png_chunks(data):
        if _is_png_xmp(kind, body):
            continue  # replaced, never duplicated
        out.append(png_chunk(kind, body))
        if kind == b"IHDR":
            out.append(itxt)
    return b"".join(out)


def _png_extract(data: bytes) -> bytes | None:
    for kind, body in _png_chunks(data):
        if _is_png_xmp(kind, body):
            rest = body[len(PNG_XMP_KEYWORD) + 1 :]
            compressed = rest[0] == 1
            rest = rest[2:]
            rest = rest[rest.index(b"\x00") + 1 :]  # language tag
            rest = rest[rest.index(b"\x00") + 1 :]  # translated keyword
            return zlib.decompress(rest) if compressed else rest
    return None


# -- JPEG --------------------------------------------------------------------------------


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(marker, payload, end offset) for each header segment up to start-of-scan."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ProvenanceError("malformed JPEG segment")
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        yield marker, data[pos + 4 : end], end
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        pos = end


def _jpeg_embed(data: bytes, packet: bytes) -> bytes:
    payload = JPEG_XMP_HEADER + packet
    if len(payload) + 2 > 0xFFFF:
        raise ProvenanceError("XMP packet too large for one JPEG APP1 segment")
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    out = [b"\xff\xd8"]
    inserted = False
    pos = 2
    for marker, body, end in _jpeg_segments(data):
        if not inserted and marker != 0xE0:  # after JFIF APP0, before everything else
            out.append(app1)
            inserted = True
        if not (marker == 0xE1 and body.startswith(JPEG_XMP_HEADER)):
            out.append(data[pos:end])
        pos = end
    out.append(data[pos:])
    return b"".join(out)


def _jpeg_extract(data: bytes) -> bytes | None:
    for marker, body, _end in _jpeg_segments(data):
        if marker == 0xE1 and body.startswith(JPEG_XMP_HEADER):
            return body[len(JPEG_XMP_HEADER) :]
    return None


# -- WebP --------------------------------------------------------------------------------


def _webp_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    pos = 12
    while pos + 8 <= len(data):
        kind = data[pos : pos + 4]
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ProvenanceError("truncated WebP chunk")
        yield kind, body
        pos += 8 + length + (length & 1)


def _webp_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) & 1 else b"")


def _webp_canvas(kind: bytes, body: bytes) -> tuple[int, int, bool]:
    """Width, height and alpha of a simple (VP8 or VP8L) WebP bitstream."""
    if kind == b"VP8L" and body[:1] == b"\x2f":
        (bits,) = struct.unpack("<I", body[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1)
    if kind == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    raise ProvenanceError("unrecognised WebP bitstream")


def _webp_embed(data: bytes, packet: bytes) -> bytes:
    chunks = [(k, b) for k, b in _webp_chunks(data) if k != b"XMP "]
    if not chunks:
        raise ProvenanceError("empty WebP file")
    if chunks[0][0] == b"VP8X":
        header = bytearray(chunks[0][1])
        header[0] |= _WEBP_XMP_FLAG
        chunks[0] = (b"VP8X", bytes(header))
    else:
        width, height, alpha = _webp_canvas(*chunks[0])
        flags = _WEBP_XMP_FLAG | (_WEBP_ALPHA_FLAG if alpha else 0)
        canvas = struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
        chunks.insert(0, (b"VP8X", bytes([flags, 0, 0, 0]) + canvas))
    chunks.append((b"XMP ", packet))
    body = b"WEBP" + b"".join(_webp_chunk(k, b) for k, b in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _webp_extract(data: bytes) -> bytes | None:
    for kind, body in _webp_chunks(data):
        if kind == b"XMP ":
            return body
    return None
