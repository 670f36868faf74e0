"""Deterministic object keys, built only from validated ids.

A key is a pure function of the request (its id and the time it was first received) and
the image's position, so a retry after a crash writes exactly the key the first attempt
wrote. Nothing user-supplied reaches a key without passing `safe_id`: no separators, no
`..`, no control characters, nothing a store or a file system could read as a path.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from zimage_pipeline.storage.errors import InvalidKeyError

# Letters, digits, dot, dash, underscore; starts with a letter or digit; at most 128.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IMAGE_EXTENSIONS = frozenset({"png", "webp", "jpeg", "jpg"})


def safe_id(value: str) -> str:
    """Return `value` unchanged if it is safe inside an object key, else raise.

    Refused: empty, longer than 128, anything but [A-Za-z0-9._-], a leading dot or dash,
    and any `..` (so no segment can climb out of its prefix on stores that map keys to
    paths).
    """
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value) or ".." in value:
        raise InvalidKeyError(f"not a safe id for an object key: {value!r:.80}")
    return value


def safe_prefix(prefix: str) -> str:
    """A configured prefix: safe ids joined by '/', or empty. Surrounding slashes dropped."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    return "/".join(safe_id(part) for part in stripped.split("/"))


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
    """`{prefix}/{yyyy}/{mm}/{dd}/{request_id}`: everything one request stores."""
    return _join(safe_prefix(prefix), _date_path(created_at), safe_id(request_id))


def image_key(prefix: str, created_at: datetime, request_id: str, index: int, ext: str) -> str:
    """`{prefix}/{yyyy}/{mm}/{dd}/{request_id}/{index}.{ext}`.

    `created_at` must be the time the request was first received (as recorded in the
    ledger), never "now": a redelivery on another day must land on the same key.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidKeyError(f"image index must be a non-negative int, got {index!r}")
    if ext not in IMAGE_EXTENSIONS:
        raise InvalidKeyError(f"unsupported image extension {ext!r:.20}")
    return f"{request_prefix(prefix, created_at, request_id)}/{index}.{ext}"


def audit_record_key(prefix: str, created_at: datetime, request_id: str) -> str:
    """`{prefix}/{yyyy}/{mm}/{dd}/{request_id}/audit.json`, beside the images."""
    return f"{request_prefix(prefix, created_at, request_id)}/audit.json"


def anchor_key(prefix: str, anchor_prefix: str, seq: int) -> str:
    """`{prefix}/{anchor_prefix}/{seq:016d}.json`: zero-padded so listing is seq order."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise InvalidKeyError(f"anchor seq must be a non-negative int, got {seq!r}")
    return f"{_join(safe_prefix(prefix), safe_prefix(anchor_prefix))}/{seq:016d}.json"
