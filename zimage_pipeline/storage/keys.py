"""Deterministic object keys, built only from validated ids.

A key is a pure function of the request (its id and the time it was first received) and
the image's position, so a retry after a crash writes exactly the key the first attempt
wrote. Nothing user-supplied reaches a key without passing `safe_id`: the id must be a
request id (the one alphabet, `zimage_pipeline/ids.py`), and the characters a key should
not hold (`:`) are percent-encoded, so `cms:asset:42` is stored under `cms%3Aasset%3A42`.
No separators, no `..`, no control characters, nothing a store or a file system could
read as a path; and since the encoding is injective, two ids never share a key.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from zimage_pipeline.ids import (
    FORBIDDEN_RUN,
    KEY_SEGMENT_MAX_LENGTH,
    KEY_SEGMENT_PATTERN,
    key_segment,
)
from zimage_pipeline.storage.errors import InvalidKeyError

_SEGMENT = re.compile(KEY_SEGMENT_PATTERN)
IMAGE_EXTENSIONS = frozenset({"png", "webp", "jpeg", "jpg", "avif"})
RENDITION_EXTENSIONS = frozenset({"png", "webp", "jpg", "avif"})


def safe_id(request_id: str) -> str:
    """The request id as it appears in a key (see `ids.key_segment`), or InvalidKeyError
    (REJECT, `INVALID_ID`) if it is not a request id: empty, longer than 128, a character
    outside `[A-Za-z0-9._:-]`, a leading dot, dash, underscore or colon, or any `..`."""
    try:
        return key_segment(request_id)
    except ValueError as exc:
        raise InvalidKeyError(f"not a request id, so not in an object key: {exc}") from exc


def safe_segment(value: str) -> str:
    """`value` unchanged if it can be one segment of a key as this project writes keys
    (letters, digits, `._-` and `%XX` escapes, not starting with `.` or `-`, no `..`),
    else InvalidKeyError."""
    if (
        not isinstance(value, str)
        or len(value) > KEY_SEGMENT_MAX_LENGTH
        or not _SEGMENT.fullmatch(value)
        or FORBIDDEN_RUN in value
    ):
        raise InvalidKeyError(f"not a safe object key segment: {value!r:.80}")
    return value


def safe_prefix(prefix: str) -> str:
    """A configured prefix: safe segments joined by '/', or empty. Surrounding slashes
    dropped."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    return "/".join(safe_segment(part) for part in stripped.split("/"))


def _date_path(created_at: datetime) -> str:
    if created_at.tzinfo is None:
        # A naive time would put the same request under different days on hosts in
        # different time zones; the caller must say what it means.
        raise InvalidKeyError("created_at must be timezone-aware")
    utc = created_at.astimezone(UTC)
    return f"{utc.year:04d}/{utc.month:02d}/{utc.day:02d}"


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def request_prefix(prefix: str, created_at: datetime, request_id: str) -> str:
    """`{prefix}/{yyyy}/{mm}/{dd}/{safe_id(request_id)}`: everything one request stores
    (its discard lists and deletes exactly this prefix)."""
    return _join(safe_prefix(prefix), _date_path(created_at), safe_id(request_id))


def image_key(prefix: str, created_at: datetime, request_id: str, index: int, ext: str) -> str:
    """`{prefix}/{yyyy}/{mm}/{dd}/{request_id}/{index}.{ext}`.

    `created_at` must be the time the request was first received (as recorded in the
    ledger), never "now": a redelivery on another day must land on the same key.
    """
    _check_index(index)
    if ext not in IMAGE_EXTENSIONS:
        raise InvalidKeyError(f"unsupported image extension {ext!r:.20}")
    return f"{request_prefix(prefix, created_at, request_id)}/{index}.{ext}"


def rendition_key(
    prefix: str, created_at: datetime, request_id: str, index: int, name: str, ext: str
) -> str:
    """`{prefix}/{yyyy}/{mm}/{dd}/{request_id}/{index}/{name}.{ext}`: an image derived
    from image `index` (a rendition), beside it and under the request's prefix, so a
    discard deletes it with the rest. `name` must be a safe segment (a plugin's choice,
    checked like an id); `ext` one of png, webp, jpg, avif."""
    _check_index(index)
    if ext not in RENDITION_EXTENSIONS:
        raise InvalidKeyError(f"unsupported rendition extension {ext!r:.20}")
    return f"{request_prefix(prefix, created_at, request_id)}/{index}/{safe_segment(name)}.{ext}"


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidKeyError(f"image index must be a non-negative int, got {index!r}")


def audit_record_key(prefix: str, created_at: datetime, request_id: str) -> str:
    """`{prefix}/{yyyy}/{mm}/{dd}/{request_id}/audit.json`, beside the images."""
    return f"{request_prefix(prefix, created_at, request_id)}/audit.json"


def anchor_key(prefix: str, anchor_prefix: str, seq: int) -> str:
    """`{prefix}/{anchor_prefix}/{seq:016d}.json`: zero-padded so listing is seq order."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise InvalidKeyError(f"anchor seq must be a non-negative int, got {seq!r}")
    return f"{_join(safe_prefix(prefix), safe_prefix(anchor_prefix))}/{seq:016d}.json"
