"""What goes over the wire to S3: metadata, tags, checksums, and which failures are transient."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from urllib.parse import quote, urlencode

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)

from zimage_pipeline.storage.errors import StorageFailedError

# AWS limits: user metadata 2 KB in all; 10 tags, key 128 and value 256 characters.
MAX_METADATA_BYTES = 2048
MAX_TAGS = 10
_META_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Characters AWS allows in tag keys and values (Unicode letters too; kept ASCII here).
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/=+\-@]")

_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",  # the bytes were damaged in transit; ours are fine, send them again
        "XAmzContentSHA256Mismatch",
        "ConditionalRequestConflict",  # a concurrent conditional write; AWS says retry
    }
)
PRECONDITION_FAILED = frozenset({"PreconditionFailed"})


def sha256_digests(data: bytes) -> tuple[str, str]:
    """(hex, base64) of SHA-256: hex for people and the ledger, base64 for S3 headers."""
    digest = hashlib.sha256(data).digest()
    return digest.hex(), base64.b64encode(digest).decode("ascii")


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_precondition_failed(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (
        error_code(exc) in PRECONDITION_FAILED or http_status(exc) == 412
    )


def is_transient(exc: BaseException) -> bool:
    """5xx, throttling, timeouts and dropped connections; a TLS failure is not transient."""
    if isinstance(exc, SSLError):
        return False
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
        return True
    if isinstance(exc, ClientError):
        status = http_status(exc)
        return status >= 500 or status in (408, 429) or error_code(exc) in _TRANSIENT_CODES
    return False


def encode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """S3 user metadata travels in HTTP headers: ASCII only. Non-ASCII and control
    characters are percent-encoded (UTF-8), so `Rédaction` arrives as `R%C3%A9daction`."""
    encoded: dict[str, str] = {}
    for key, value in metadata.items():
        name = key.lower()
        if not _META_KEY.fullmatch(name):
            raise StorageFailedError(f"metadata key not allowed: {key!r:.70}")
        encoded[name] = quote(str(value), safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")
    size = sum(len(k) + len(v) for k, v in encoded.items())
    if size > MAX_METADATA_BYTES:
        raise StorageFailedError(f"object metadata is {size} bytes, more than {MAX_METADATA_BYTES}")
    return encoded


def encode_tags(tags: Mapping[str, str]) -> str:
    """The `Tagging` header: at most 10 tags; characters S3 refuses become `_`."""
    if len(tags) > MAX_TAGS:
        raise StorageFailedError(f"{len(tags)} tags, at most {MAX_TAGS} allowed")
    clean = {
        _TAG_UNSAFE.sub("_", key)[:128]: _TAG_UNSAFE.sub("_", str(value))[:256]
        for key, value in tags.items()
    }
    return urlencode(clean)


def describe(exc: BaseException) -> str:
    """A short cause for messages; boto's texts carry no credentials."""
    if isinstance(exc, ClientError):
        return f"{error_code(exc) or 'error'} (HTTP {http_status(exc)})"
    if isinstance(exc, BotoCoreError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}"
