"""Read an input image by reference: the reference's bucket and key checked again and
the grant judged first (nothing is read outside it), then the bytes through the Objects
port, then the client's checksum, then the decode."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from zimage_pipeline import s3names
from zimage_pipeline.errors import DependencyUnavailable, InvalidRequestError, RequestRejectedError
from zimage_pipeline.inputs.decode import DecodedImage, InputLimits, load_image
from zimage_pipeline.inputs.grants import is_allowed
from zimage_pipeline.inputs.model import InputGrant
from zimage_pipeline.messages import ImageRef
from zimage_pipeline.ports import Objects
from zimage_pipeline.storage.errors import ObjectNotFoundError, ObjectTooLargeError, StorageError


def read_input(
    objects: Objects,
    ref: ImageRef,
    *,
    grants: Iterable[InputGrant],
    limits: InputLimits,
    what: str,
) -> DecodedImage:
    check_readable(ref, grants=grants, what=what)
    try:
        data = objects.get_object(
            ref.key, bucket=ref.bucket, version_id=ref.version_id, max_bytes=limits.max_bytes
        )
    except ObjectNotFoundError:
        version = f" (version {ref.version_id})" if ref.version_id else ""
        raise InvalidRequestError(f"{what}: {ref.uri()}{version} not found") from None
    except ObjectTooLargeError:
        raise InvalidRequestError(
            f"{what}: {ref.uri()} is over {limits.max_bytes} bytes (inputs.max_bytes)"
        ) from None
    except StorageError as exc:
        # The store is down or refusing for now: the delivery is retried later.
        raise DependencyUnavailable(f"{what}: the input store cannot be read: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise InvalidRequestError(
            f"{what}: {ref.uri()} has SHA-256 {digest[:12]}..., not the "
            f"{ref.sha256[:12]}... the request states"
        )
    return load_image(data, limits=limits, what=what, mask=what == "mask_image")


def check_readable(ref: ImageRef, *, grants: Iterable[InputGrant], what: str) -> None:
    """The reference well formed and inside the publisher's grants, or the refusal."""
    checked_ref(ref, what)
    if not is_allowed(ref, grants):
        raise RequestRejectedError(
            f"{what}: {ref.uri()} is outside the places your requests may read from",
            reason="NOT_AUTHORIZED",
        )


def checked_ref(ref: ImageRef, what: str) -> None:
    """The contract's rules for bucket and key (s3names), again, before the grant is
    judged or anything read: a reference built without validation (model_construct, a
    plugin, a future code path) must not reach the store with a `..` or a control
    character in it."""
    for field, problem in (
        ("bucket", s3names.bucket_problem(ref.bucket)),
        ("key", s3names.key_problem(ref.key)),
    ):
        if problem is not None:
            raise InvalidRequestError(f"{what}.{field}: {problem}")
