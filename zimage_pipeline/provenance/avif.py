"""XMP inside AVIF files (HEIF, ISO/IEC 23008-12), added without re-encoding.

HEIF keeps XMP as an item of its own: an `infe` entry of type `mime` with content type
`application/rdf+xml`, located by an `iloc` entry and linked to the primary image by a
`cdsc` ("content describes") reference in `iref`. Adding one means growing the `meta`
box by those entries and appending the packet in an `mdat` box at the end of the file.
Since `meta` grows, every `iloc` offset into the file behind it (construction method 0)
moves by as many bytes; offsets into `idat` (method 1) are relative and stay.

Image sequences (`moov`, with offsets of their own in `stco`/`co64`) are refused, and so
is a file that already carries an XMP item: marking never leaves two packets that
disagree, and a derived image reaches us unmarked.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from zimage_pipeline.provenance.errors import ProvenanceError

XMP_CONTENT_TYPE = b"application/rdf+xml"
_AVIF_BRANDS = (b"avif", b"avis")


@dataclass(frozen=True, slots=True)
class _Box:
    kind: bytes
    start: int
    header: int  # 8, or 16 with a 64-bit size
    end: int

    def payload(self, data: bytes) -> bytes:
        return data[self.start + self.header : self.end]


@dataclass(slots=True)
class _Extent:
    index: int
    offset: int
    length: int


@dataclass(slots=True)
class _Location:
    item_id: int
    method: int  # construction method: 0 file offset, 1 idat offset, 2 item reference
    data_ref: int
    base: int
    extents: list[_Extent] = field(default_factory=list)


@dataclass(slots=True)
class _Iloc:
    version: int
    offset_size: int
    length_size: int
    base_size: int
    index_size: int
    items: list[_Location]


def is_avif(data: bytes) -> bool:
    """An ISO BMFF file whose `ftyp` names an AVIF brand (major or compatible)."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return False
    (size,) = struct.unpack(">I", data[:4])
    end = min(size, len(data))
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, end - 3, 4)]
    return any(brand in _AVIF_BRANDS for brand in brands)


# -- boxes -------------------------------------------------------------------------------


def _boxes(data: bytes, start: int, end: int) -> Iterator[_Box]:
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise ProvenanceError("truncated AVIF box")
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
            header = 16
        elif size == 0:  # the last box, up to the end of its parent
            size = end - pos
        if size < header or pos + size > end:
            raise ProvenanceError("malformed AVIF box")
        yield _Box(kind, pos, header, pos + size)
        pos += size


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags) + payload)


def _version(payload: bytes) -> int:
    if len(payload) < 4:
        raise ProvenanceError("truncated AVIF full box")
    return payload[0]


class _Reader:
    """Big-endian unsigned fields of 0, 2, 4 or 8 bytes, read in sequence."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def uint(self, size: int) -> int:
        if size == 0:
            return 0
        if size not in (2, 4, 8) or self.pos + size > len(self.data):
            raise ProvenanceError("malformed AVIF field")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return value

    def cstring(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise ProvenanceError("unterminated string in AVIF box")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return value


def _uint(value: int, size: int) -> bytes:
    if size == 0:
        if value:
            raise ProvenanceError("AVIF offset does not fit its iloc field")
        return b""
    if value >= 1 << (8 * size):
        raise ProvenanceError("AVIF offset does not fit its iloc field")
    return value.to_bytes(size, "big")


# -- iloc --------------------------------------------------------------------------------


def _parse_iloc(payload: bytes) -> _Iloc:
    version = _version(payload)
    if version > 2:
        raise ProvenanceError(f"unsupported AVIF iloc version {version}")
    r = _Reader(payload, 4)
    sizes = r.uint(2)
    offset_size, length_size = sizes >> 12, (sizes >> 8) & 0xF
    base_size, index_size = (sizes >> 4) & 0xF, sizes & 0xF if version else 0
    id_size = 4 if version == 2 else 2
    items = []
    for _ in range(r.uint(id_size)):
        item_id = r.uint(id_size)
        method = r.uint(2) & 0xF if version else 0
        location = _Location(item_id, method, r.uint(2), r.uint(base_size))
        for _ in range(r.uint(2)):
            index = r.uint(index_size)
            location.extents.append(_Extent(index, r.uint(offset_size), r.uint(length_size)))
        items.append(location)
    return _Iloc(version, offset_size, length_size, base_size, index_size, items)


def _serialise_iloc(iloc: _Iloc) -> bytes:
    v = iloc.version
    id_size = 4 if v == 2 else 2
    sizes = (iloc.offset_size << 12) | (iloc.length_size << 8) | (iloc.base_size << 4)
    out = [_uint(sizes | (iloc.index_size if v else 0), 2), _uint(len(iloc.items), id_size)]
    for item in iloc.items:
        out.append(_uint(item.item_id, id_size))
        if v:
            out.append(_uint(item.method, 2))
        out += [_uint(item.data_ref, 2), _uint(item.base, iloc.base_size)]
        out.append(_uint(len(item.extents), 2))
        for extent in item.extents:
            if v and iloc.index_size:
                out.append(_uint(extent.index, iloc.index_size))
            out.append(_uint(extent.offset, iloc.offset_size))
            out.append(_uint(extent.length, iloc.length_size))
    return _full_box(b"iloc", v, 0, b"".join(out))


def _shift(iloc: _Iloc, *, after: int, delta: int) -> None:
    """Move every file offset at or beyond `after` by `delta` bytes."""
    for item in iloc.items:
        if item.method != 0 or item.data_ref != 0:
            continue  # relative to idat, or in another file: unaffected
        if item.base and item.base >= after:
            item.base += delta
            continue
        for extent in item.extents:
            if item.base + extent.offset >= after:
                extent.offset += delta


# -- iinf, pitm, iref --------------------------------------------------------------------


def _item_entries(iinf: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(item id, item type, content type) of each `infe` of version 2 or 3."""
    start = 4 + (2 if _version(iinf) == 0 else 4)
    for box in _boxes(iinf, start, len(iinf)):
        payload = box.payload(iinf)
        if box.kind != b"infe" or _version(payload) < 2:
            continue
        r = _Reader(payload, 4)
        item_id = r.uint(2 if _version(payload) == 2 else 4)
        r.uint(2)  # item_protection_index
        item_type = payload[r.pos : r.pos + 4]
        r.pos += 4
        r.cstring()  # item_name
        yield item_id, item_type, r.cstring() if item_type == b"mime" else b""


def _xmp_item(iinf: bytes) -> int | None:
    for item_id, item_type, content_type in _item_entries(iinf):
        if item_type == b"mime" and content_type == XMP_CONTENT_TYPE:
            return item_id
    return None


def _with_entry(iinf: bytes, item_id: int) -> bytes:
    """`iinf` with one more `infe`: a `mime` item holding XMP."""
    version = _version(iinf)
    count_size = 2 if version == 0 else 4
    count = int.from_bytes(iinf[4 : 4 + count_size], "big")
    infe_version, id_size = (2, 2) if item_id <= 0xFFFF else (3, 4)
    infe = _full_box(
        b"infe",
        infe_version,
        0,
        _uint(item_id, id_size) + b"\x00\x00mime" + b"XMP\x00" + XMP_CONTENT_TYPE + b"\x00",
    )
    entries = iinf[4 + count_size :]
    return _full_box(b"iinf", version, 0, _uint(count + 1, count_size) + entries + infe)


def _primary_item(pitm: bytes) -> int:
    return _Reader(pitm, 4).uint(2 if _version(pitm) == 0 else 4)


def _with_reference(iref: bytes | None, from_id: int, to_id: int) -> bytes:
    """`iref` (or a new one) with a `cdsc` reference: the XMP describes the primary item."""
    version = 0 if iref is None else _version(iref)
    id_size = 2 if version == 0 else 4
    cdsc = _box(b"cdsc", _uint(from_id, id_size) + _uint(1, 2) + _uint(to_id, id_size))
    existing = b"" if iref is None else iref[4:]
    return _full_box(b"iref", version, 0, existing + cdsc)


# -- meta --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Meta:
    box: _Box
    children: list[tuple[bytes, bytes]]  # (kind, payload), in file order

    def child(self, kind: bytes) -> bytes | None:
        return next((payload for k, payload in self.children if k == kind), None)

    def required(self, kind: bytes) -> bytes:
        payload = self.child(kind)
        if payload is None:
            raise ProvenanceError(f"AVIF meta box without {kind.decode()}")
        return payload


def _meta(data: bytes) -> _Meta:
    top = list(_boxes(data, 0, len(data)))
    if any(box.kind == b"moov" for box in top):
        raise ProvenanceError("AVIF image sequences are not supported")
    metas = [box for box in top if box.kind == b"meta"]
    if len(metas) != 1:
        raise ProvenanceError("AVIF file without exactly one meta box")
    meta = metas[0]
    body_start = meta.start + meta.header + 4  # meta is a full box
    children = [(b.kind, b.payload(data)) for b in _boxes(data, body_start, meta.end)]
    return _Meta(meta, children)


def _new_id(meta: _Meta, iloc: _Iloc) -> int:
    ids = [item.item_id for item in iloc.items]
    ids += [item_id for item_id, _, _ in _item_entries(meta.required(b"iinf"))]
    new_id = max(ids, default=0) + 1
    if iloc.version < 2 and new_id > 0xFFFF:
        raise ProvenanceError("AVIF file has too many items to add XMP")
    return new_id


def _rebuilt_meta(meta: _Meta, data: bytes, replaced: dict[bytes, bytes]) -> bytes:
    """The meta box with some children replaced (whole boxes), `iref` added if new."""
    head = data[meta.box.start + meta.box.header : meta.box.start + meta.box.header + 4]
    children = []
    for kind, payload in meta.children:
        children.append(replaced.get(kind, _box(kind, payload)))
        if kind == b"iinf" and meta.child(b"iref") is None:
            children.append(replaced[b"iref"])
    return _box(b"meta", head + b"".join(children))


def embed(data: bytes, packet: bytes) -> bytes:
    """`data` with `packet` as its XMP item; the coded image bytes are not touched."""
    meta = _meta(data)
    iinf = meta.required(b"iinf")
    if _xmp_item(iinf) is not None:
        raise ProvenanceError("AVIF file already carries an XMP item")
    iloc = _parse_iloc(meta.required(b"iloc"))
    xmp_id = _new_id(meta, iloc)
    # Every offset in iloc must be able to move: 0-byte fields hold nothing to move.
    iloc.offset_size = max(iloc.offset_size, 4)
    iloc.length_size = max(iloc.length_size, 4)
    xmp = _Location(xmp_id, 0, 0, 0, [_Extent(0, 0, len(packet))])
    iloc.items.append(xmp)
    replaced = {
        b"iinf": _with_entry(iinf, xmp_id),
        b"iref": _with_reference(
            meta.child(b"iref"), xmp_id, _primary_item(meta.required(b"pitm"))
        ),
        b"iloc": _serialise_iloc(iloc),  # sized already; offsets are filled in below
    }
    delta = len(_rebuilt_meta(meta, data, replaced)) - (meta.box.end - meta.box.start)
    _shift(iloc, after=meta.box.end, delta=delta)
    xmp.extents[0].offset = len(data) + delta + 8  # in the mdat appended below
    replaced[b"iloc"] = _serialise_iloc(iloc)
    rebuilt = _rebuilt_meta(meta, data, replaced)
    return data[: meta.box.start] + rebuilt + data[meta.box.end :] + _box(b"mdat", packet)


def extract(data: bytes) -> bytes | None:
    """The XMP item's bytes, None if the file has none."""
    meta = _meta(data)
    xmp_id = _xmp_item(meta.required(b"iinf"))
    if xmp_id is None:
        return None
    iloc = _parse_iloc(meta.required(b"iloc"))
    location = next((item for item in iloc.items if item.item_id == xmp_id), None)
    if location is None or location.method not in (0, 1):
        raise ProvenanceError("AVIF XMP item has no readable location")
    source = data if location.method == 0 else meta.required(b"idat")
    parts = []
    for extent in location.extents:
        start = location.base + extent.offset
        end = start + extent.length if extent.length else len(source)
        if end > len(source):
            raise ProvenanceError("AVIF XMP item beyond the end of the file")
        parts.append(source[start:end])
    return b"".join(parts)
