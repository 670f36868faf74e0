"""Errors of the object store adapter; each names its disposition and a stable reason."""

from __future__ import annotations

from zimage_pipeline.errors import Disposition, ZImageError


class StorageError(ZImageError):
    """Root of the storage errors."""

    disposition = Disposition.FAIL
    reason = "STORAGE_FAILED"


class InvalidKeyError(StorageError):
    """An id or key part that is not safe inside an object key: the request is wrong."""

    disposition = Disposition.REJECT
    reason = "INVALID_ID"


class ObjectConflictError(StorageError):
    """The key already holds different content; never overwritten."""

    disposition = Disposition.FAIL
    reason = "OBJECT_CONFLICT"


class ObjectNotFoundError(StorageError):
    """The key (or the version asked for) is not in the store."""

    disposition = Disposition.REJECT
    reason = "INVALID_REQUEST"


class ObjectTooLargeError(StorageError):
    """The object is larger than the reader takes; it was not read."""

    disposition = Disposition.REJECT
    reason = "INVALID_REQUEST"


class StorageFailedError(StorageError):
    """The upload did not succeed within the retry budget, or the store refused it."""

    disposition = Disposition.FAIL
    reason = "STORAGE_FAILED"
