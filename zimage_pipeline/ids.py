"""Request ids: the one alphabet, and how an id is written inside an object key.

Every check of a request id derives from this module: the message schema (`RequestId`
in messages.py, hence the published JSON Schemas, the request and the cancel message, and
`peek_request_id`) and storage (`storage/keys.py`).

The alphabet: 1 to 128 characters, letters, digits and `. _ : -`, starting with a letter
or a digit, never `..`. `:` is in it because a CMS's URNs (`cms:asset:42`) are natural
ids. An id does not travel into an object key as it is: the characters a key should not
hold are percent-encoded there (`key_segment`), `cms:asset:42` -> `cms%3Aasset%3A42`.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Final

REQUEST_ID_MAX_LENGTH: Final = 128
# Letters, digits, `. _ : -`; first a letter or a digit.
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
# ...and never this run: no id may read as a parent directory on a store that maps keys
# to paths, wherever it ends up. A rule of its own, so its refusal can say so.
FORBIDDEN_RUN: Final = ".."
FORBIDDEN_RUN_MESSAGE: Final = f"must not contain {FORBIDDEN_RUN!r}"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

# What an object key holds as itself: RFC 3986's unreserved characters without `~` (which
# AWS lists among the characters to avoid). Everything else in an id (today only `:`,
# which AWS lists as needing special handling, and which file-system-backed stores may
# not hold) is written `%XX` per UTF-8 byte, uppercase hex. `%` is never in an id, so the
# encoding is injective, and an id made only of these characters is its own segment.
KEY_SAFE_CHARACTERS: Final = frozenset(string.ascii_letters + string.digits + "._-")
# A key segment as this project writes it: safe characters and `%XX` escapes, starting
# with a letter, a digit or an escape (never `.` or `-`); `..` is refused separately.
KEY_SEGMENT_PATTERN: Final = r"(?:[A-Za-z0-9]|%[0-9A-F]{2})(?:[A-Za-z0-9._-]|%[0-9A-F]{2})*"
# The longest segment an id can become: every character escaped (all are ASCII).
KEY_SEGMENT_MAX_LENGTH: Final = 3 * REQUEST_ID_MAX_LENGTH
_ESCAPE = re.compile(r"%([0-9A-F]{2})")
SCOPE_SEPARATOR: Final = "@"
SCOPE_HASH_LENGTH: Final = 12
_SCOPED = re.compile(rf"^(.+){SCOPE_SEPARATOR}[0-9a-f]{{{SCOPE_HASH_LENGTH}}}$")


def no_forbidden_run(value: str) -> str:
    """The `..` rule alone (the schema's pattern carries the rest)."""
    if FORBIDDEN_RUN in value:
        raise ValueError(FORBIDDEN_RUN_MESSAGE)
    return value


def is_request_id(value: object) -> bool:
    """Whether `value` is a request id (the schema accepts it)."""
    return (
        isinstance(value, str)
        and len(value) <= REQUEST_ID_MAX_LENGTH
        and _REQUEST_ID.fullmatch(value) is not None
        and FORBIDDEN_RUN not in value
    )


def check_request_id(value: object) -> str:
    """`value` if it is a request id, else ValueError naming the rule broken (never the
    value: it may be anything a client sent)."""
    if not isinstance(value, str):
        raise ValueError("a request id is a string")
    if not 1 <= len(value) <= REQUEST_ID_MAX_LENGTH:
        raise ValueError(f"a request id has 1 to {REQUEST_ID_MAX_LENGTH} characters")
    if not _REQUEST_ID.fullmatch(value):
        raise ValueError(
            "a request id has letters, digits and . _ : - only, and starts with a letter or a digit"
        )
    return no_forbidden_run(value)


def scoped_key(request_id: str, publisher: str) -> str:
    """The ledger's key for `publisher`'s request `request_id` when another publisher
    already holds that id (the first to use an id keeps it bare): `<id>@<hash>`. `@` is
    outside the request-id alphabet, so a scoped key is never a client's id, and the hash
    (of the publisher and the whole id) keeps two publishers apart; a long id is cut so
    that the key stays within REQUEST_ID_MAX_LENGTH."""
    digest = hashlib.sha256(f"{publisher}\0{request_id}".encode()).hexdigest()
    room = REQUEST_ID_MAX_LENGTH - len(SCOPE_SEPARATOR) - SCOPE_HASH_LENGTH
    return f"{request_id[:room]}{SCOPE_SEPARATOR}{digest[:SCOPE_HASH_LENGTH]}"


def is_scoped_key(value: str) -> bool:
    return _SCOPED.fullmatch(value) is not None


def check_ledger_key(value: object) -> str:
    """`value` if the ledger may key a request by it (a request id, or a scoped key of
    one), else ValueError naming the rule broken."""
    if isinstance(value, str) and (scoped := _SCOPED.fullmatch(value)):
        check_request_id(scoped.group(1))
        if len(value) > REQUEST_ID_MAX_LENGTH:
            raise ValueError(f"a request key has at most {REQUEST_ID_MAX_LENGTH} characters")
        return value
    return check_request_id(value)


def key_segment(request_id: str) -> str:
    """The request id (or scoped key) as one object-key segment: ValueError if it is not
    one; otherwise each character outside KEY_SAFE_CHARACTERS becomes `%XX` (its UTF-8
    bytes)."""
    return "".join(_escaped(char) for char in check_ledger_key(request_id))


def request_id_of_segment(segment: str) -> str:
    """The inverse of `key_segment`: ValueError for anything `key_segment` never writes
    (lowercase hex, an escaped safe character, a stray `%`, no id once decoded)."""
    decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), segment)
    try:
        check_ledger_key(decoded)
    except ValueError:
        raise ValueError("not a key segment written for a request id") from None
    if key_segment(decoded) != segment:
        raise ValueError("not a key segment written for a request id")
    return decoded


def _escaped(char: str) -> str:
    if char in KEY_SAFE_CHARACTERS:
        return char
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
