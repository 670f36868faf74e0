"""S3-compatible object storage: deterministic keys, checksummed never-overwriting uploads."""

from __future__ import annotations

from zimage_pipeline.ports import StoredObject
from zimage_pipeline.storage.errors import (
    InvalidKeyError,
    ObjectConflictError,
    StorageError,
    StorageFailedError,
)
from zimage_pipeline.storage.keys import (
    anchor_key,
    audit_record_key,
    image_key,
    request_prefix,
    safe_id,
    safe_prefix,
    safe_segment,
)
from zimage_pipeline.storage.s3 import ObjectStore, canonical_json

__all__ = [
    "InvalidKeyError",
    "ObjectConflictError",
    "ObjectStore",
    "StorageError",
    "StorageFailedError",
    "StoredObject",
    "anchor_key",
    "audit_record_key",
    "canonical_json",
    "image_key",
    "request_prefix",
    "safe_id",
    "safe_prefix",
    "safe_segment",
]
