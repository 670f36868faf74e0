"""S3 bucket names and object keys a client (or a policy grant) may name. Pure, no I/O:
the contract (`messages.ImageRef`), the policy's input grants and the inputs path all
check with these, so a name is judged the same everywhere.

Buckets follow S3's rules for general purpose buckets: 3-63 characters of lowercase
letters, digits, dots and hyphens, starting and ending with a letter or digit, no two
adjacent dots, not an IPv4 address, and none of the prefixes and suffixes S3 reserves
(`xn--`, `sthree-`, `amzn-s3-demo-`; `-s3alias`, `--ol-s3`, `.mrap`, `--x-s3`,
`--table-s3`).

Keys are literal in S3, but proxies, gateways and other S3-compatible stores normalise
paths, and a prefix grant is a folder: a key with `.` or `..` segments, empty segments
(`a//b`, a leading or trailing `/`) or control characters (C0, DEL and C1, tab and
newlines included) could name something else than it seems to, so it is refused.
"""

from __future__ import annotations

import re
from typing import Final

MAX_KEY_BYTES: Final = 1024  # S3's limit on a key's UTF-8 length

_BUCKET_CHARS: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4: Final = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
RESERVED_BUCKET_PREFIXES: Final = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_BUCKET_SUFFIXES: Final = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# C0 controls (tab, newlines included), DEL, and the C1 controls.
_KEY_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _ecma_literal(text: str) -> str:
    # re.escape would write `\-`, which ECMA-262 (JSON Schema's regex dialect) refuses in
    # unicode mode; of these names' characters only the dot is special.
    return text.replace(".", r"\.")


# The same rules as JSON Schema regular expressions (docs/schemas/), so a schema-valid
# reference is one the worker accepts.
BUCKET_SCHEMA_PATTERN: Final = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
BUCKET_SCHEMA_NOT: Final = (
    r"\.\.|^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$|^("
    + "|".join(_ecma_literal(p) for p in RESERVED_BUCKET_PREFIXES)
    + ")|("
    + "|".join(_ecma_literal(s) for s in RESERVED_BUCKET_SUFFIXES)
    + ")$"
)
KEY_SCHEMA_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]+$"
KEY_SCHEMA_NOT: Final = r"(^|/)\.{0,2}(/|$)"  # an empty, `.` or `..` segment


def bucket_problem(name: str) -> str | None:
    """Why `name` is not an S3 bucket name, or None if it is one."""
    if not 3 <= len(name) <= 63:
        return f"must be 3 to 63 characters, not {len(name)}"
    if not _BUCKET_CHARS.fullmatch(name):
        return (
            "must be lowercase letters, digits, dots and hyphens, "
            "starting and ending with a letter or digit"
        )
    if ".." in name:
        return "must not contain two adjacent dots"
    if _IPV4.fullmatch(name):
        return "must not be an IP address"
    for prefix in RESERVED_BUCKET_PREFIXES:
        if name.startswith(prefix):
            return f"must not start with {prefix!r} (reserved by S3)"
    for suffix in RESERVED_BUCKET_SUFFIXES:
        if name.endswith(suffix):
            return f"must not end with {suffix!r} (reserved by S3)"
    return None


def key_problem(key: str) -> str | None:
    """Why `key` is not a plain object key, or None if it is one."""
    if not key:
        return "must not be empty"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"must be at most {MAX_KEY_BYTES} bytes of UTF-8"
    control = _KEY_CONTROL.search(key)
    if control is not None:
        return f"must not contain control characters (U+{ord(control.group()):04X})"
    return path_problem(key)


def path_problem(path: str) -> str | None:
    """Why the `/`-separated `path` has a segment that is empty, `.` or `..`, or None."""
    for segment in path.split("/"):
        if segment == "":
            return "must not have empty segments (a leading, trailing or doubled '/')"
        if segment in (".", ".."):
            return f"must not have {segment!r} segments"
    return None
