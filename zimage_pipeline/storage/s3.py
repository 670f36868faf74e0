"""ObjectStore: checksummed, never-overwriting uploads to any S3-compatible store.

Every upload sends its SHA-256 (`x-amz-checksum-sha256`), which the store verifies before
it accepts the object, and is conditional (`If-None-Match: *`): an object, once written,
is never replaced. When the key is taken, the existing object's checksum decides: the
same bytes (a retry after a crash or a lost response) count as success, different bytes
raise ObjectConflictError. For stores without conditional writes
(`storage.conditional_writes = false`) the same check is done by a HEAD before the PUT,
with the small race that implies.

Transient failures (5xx, throttling, timeouts, dropped connections, a body shorter than
its Content-Length) are retried with capped exponential backoff and full jitter, within
`storage.max_attempts` and `storage.retry_budget_s`; after that, or on a permanent
refusal, StorageFailedError.
All calls are synchronous: the worker runs them in its I/O thread pool.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError

from zimage_pipeline.ports import StoredObject
from zimage_pipeline.settings import StorageSettings
from zimage_pipeline.storage import wire
from zimage_pipeline.storage.client import make_s3_client
from zimage_pipeline.storage.errors import (
    InvalidKeyError,
    ObjectConflictError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageFailedError,
)
from zimage_pipeline.storage.keys import safe_segment

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most seven days
MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 length
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchVersion", "NoSuchBucket", "404"})
_jitter = secrets.SystemRandom()


def checked_key(key: str) -> str:
    """Every segment of a key must be a safe segment (no empty segment, no `..`, ids
    already encoded), and the key within S3's 1024 bytes."""
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"object key longer than {MAX_KEY_BYTES} bytes: {key!r:.80}")
    return "/".join(safe_segment(part) for part in key.split("/"))


class ObjectStore:
    def __init__(
        self,
        settings: StorageSettings,
        *,
        client: S3Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client: S3Client = client or make_s3_client(settings, max_attempts=1)
        self._sleep = sleep
        self._clock = clock
        self._lock_enabled: dict[str, bool] = {}

    # -- uploads ---------------------------------------------------------------------

    def put_object(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str],
        tags: Mapping[str, str],
        bucket: str | None = None,
        retain_until: datetime | None = None,
        lock_mode: str | None = None,
        digests: tuple[str, str] | None = None,
    ) -> StoredObject:
        """Upload `data` under `key` once; identical content already there is success.
        `digests`: `wire.sha256_digests(data)` if the caller has it already (hashing a
        1.5 MB image is a millisecond of the control plane's CPU)."""
        bucket = bucket or self.settings.bucket
        key = checked_key(key)
        sha_hex, sha_b64 = digests or wire.sha256_digests(data)
        params: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Body": data,
            "ContentType": content_type,
            "ChecksumSHA256": sha_b64,
            # Our own copy of the digest: the fallback when a store keeps no checksum.
            "Metadata": wire.encode_metadata({**metadata, "sha256": sha_hex}),
        }
        if tags:
            params["Tagging"] = wire.encode_tags(tags)
        if retain_until is not None:
            params["ObjectLockMode"] = lock_mode or "COMPLIANCE"
            params["ObjectLockRetainUntilDate"] = retain_until
        if self.settings.conditional_writes:
            params["IfNoneMatch"] = "*"

        def attempt() -> StoredObject:
            if not self.settings.conditional_writes:
                existing = self._existing(bucket, key, sha_hex, sha_b64)
                if existing is not None:
                    return existing
            try:
                response = self.client.put_object(**params)
            except ClientError as exc:
                if not wire.is_precondition_failed(exc):
                    raise
                existing = self._existing(bucket, key, sha_hex, sha_b64)
                if existing is None:  # deleted between the PUT and the HEAD: give up loudly
                    raise StorageFailedError(f"s3://{bucket}/{key}: vanished") from exc
                return existing
            returned = response.get("ChecksumSHA256")
            if returned is not None and returned != sha_b64:
                raise StorageFailedError(f"s3://{bucket}/{key}: store reports another checksum")
            if returned is None:
                # The store did not confirm the checksum: read it back before trusting it.
                existing = self._existing(bucket, key, sha_hex, sha_b64)
                if existing is None:
                    raise StorageFailedError(f"s3://{bucket}/{key}: not found after upload")
                return existing
            return StoredObject(bucket, key, response.get("VersionId"), sha_hex, len(data))

        return self._retrying(f"put s3://{bucket}/{key}", attempt)

    def put_json(
        self,
        key: str,
        obj: Any,
        *,
        bucket: str | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        retain_until: datetime | None = None,
        lock_mode: str | None = None,
    ) -> StoredObject:
        """Canonical JSON (sorted keys, UTF-8), so the same record always has the same
        bytes and a retry after a crash is recognised as identical."""
        data = canonical_json(obj)
        return self.put_object(
            key,
            data,
            content_type="application/json",
            metadata=metadata or {},
            tags=tags or {},
            bucket=bucket,
            retain_until=retain_until,
            lock_mode=lock_mode,
        )

    def _existing(self, bucket: str, key: str, sha_hex: str, sha_b64: str) -> StoredObject | None:
        """The object at `key` if it holds our bytes, None if absent; conflict otherwise."""
        try:
            head = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if wire.http_status(exc) == 404 or wire.error_code(exc) in ("404", "NoSuchKey"):
                return None
            raise
        their_b64 = head.get("ChecksumSHA256")
        their_hex = head.get("Metadata", {}).get("sha256")
        if their_b64 is not None and "-" not in their_b64:
            same = their_b64 == sha_b64
        elif their_hex is not None:
            same = their_hex == sha_hex
        else:  # neither kept: hash the bytes themselves
            same = wire.sha256_digests(self.get_object(key, bucket=bucket))[0] == sha_hex
        if not same:
            raise ObjectConflictError(f"s3://{bucket}/{key} already holds different content")
        return StoredObject(
            bucket, key, head.get("VersionId"), sha_hex, int(head.get("ContentLength", 0))
        )

    # -- reads -----------------------------------------------------------------------

    def get_object(
        self,
        key: str,
        *,
        bucket: str | None = None,
        version_id: str | None = None,
        max_bytes: int | None = None,
    ) -> bytes:
        bucket = bucket or self.settings.bucket
        params: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id

        def attempt() -> bytes:
            try:
                response = self.client.get_object(**params)
            except ClientError as exc:
                if _is_missing(exc, version_id=version_id):
                    version = f" (version {version_id})" if version_id is not None else ""
                    raise ObjectNotFoundError(f"s3://{bucket}/{key}{version} not found") from None
                raise
            body = response["Body"]
            if version_id is not None and response.get("VersionId") != version_id:
                # A store that keeps no versions (an unversioned bucket) ignores the
                # VersionId it is given and returns the current object: what was asked
                # for was not read, and the trail must not say it was.
                body.close()
                raise ObjectNotFoundError(
                    f"s3://{bucket}/{key} (version {version_id}) not found: the store "
                    f"returned {_version_shown(response.get('VersionId'))}"
                )
            declared = response.get("ContentLength")
            try:
                if max_bytes is not None and declared is not None and declared > max_bytes:
                    raise ObjectTooLargeError(f"s3://{bucket}/{key} is over {max_bytes} bytes")
                # Bounded: a length the store misreported stops at one byte over.
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()
            if max_bytes is not None and len(data) > max_bytes:
                raise ObjectTooLargeError(f"s3://{bucket}/{key} is over {max_bytes} bytes")
            if declared is not None and len(data) < declared:
                # A short read (the connection dropped mid-body, the store sent less than
                # it announced): a transient failure of the transfer, retried like any
                # dropped connection, never bytes to judge (a caller comparing checksums
                # would blame the client for our network).
                raise IncompleteReadError(actual_bytes=len(data), expected_bytes=declared)
            return data

        return self._retrying(f"get s3://{bucket}/{key}", attempt)

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> Iterator[str]:
        """Keys under `prefix`, in the store's (lexicographic) order."""
        bucket = bucket or self.settings.bucket
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]
        except (ClientError, BotoCoreError) as exc:
            raise StorageFailedError(f"list s3://{bucket}/{prefix}: {wire.describe(exc)}") from exc

    def list_children(
        self, prefix: str, *, bucket: str | None = None
    ) -> tuple[list[str], list[str]]:
        """One level under `prefix` (ending in '/'): the keys directly in it, and its
        sub-prefixes (each ending in '/'), without listing every key beneath those."""
        bucket = bucket or self.settings.bucket
        keys: list[str] = []
        children: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                keys.extend(item["Key"] for item in page.get("Contents", []))
                children.extend(item["Prefix"] for item in page.get("CommonPrefixes", []))
        except (ClientError, BotoCoreError) as exc:
            raise StorageFailedError(f"list s3://{bucket}/{prefix}: {wire.describe(exc)}") from exc
        return keys, children

    def delete_object(self, key: str, *, bucket: str | None = None) -> None:
        """Delete `key` (absent is fine: S3 deletes are idempotent). One attempt, no
        retries: the callers (discards of failed requests) are retried by the worker's
        maintenance sweep, and must not hold a failing request for a retry budget."""
        bucket = bucket or self.settings.bucket
        try:
            self.client.delete_object(Bucket=bucket, Key=checked_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise StorageFailedError(f"delete s3://{bucket}/{key}: {wire.describe(exc)}") from exc

    def presign_get(self, key: str, ttl_s: int, *, bucket: str | None = None) -> str:
        """A GET URL valid for `ttl_s` seconds (1 s to 7 days); signing is local, no I/O."""
        if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
            raise StorageFailedError(f"presign ttl {ttl_s}s outside 1..{MAX_PRESIGN_TTL_S}")
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket or self.settings.bucket, "Key": checked_key(key)},
            ExpiresIn=ttl_s,
        )

    def object_lock_enabled(self, bucket: str) -> bool:
        """Whether `bucket` has Object Lock on (it can only be set at bucket creation)."""
        if bucket not in self._lock_enabled:
            try:
                response = self.client.get_object_lock_configuration(Bucket=bucket)
                config = response.get("ObjectLockConfiguration", {})
                self._lock_enabled[bucket] = config.get("ObjectLockEnabled") == "Enabled"
            except ClientError:
                # Not configured, or a store that does not implement Object Lock at all.
                self._lock_enabled[bucket] = False
            except BotoCoreError as exc:
                raise StorageFailedError(f"s3://{bucket}: {wire.describe(exc)}") from exc
        return self._lock_enabled[bucket]

    def check_buckets(self, buckets: Sequence[str]) -> None:
        """Each bucket answers a HEAD with these credentials (one attempt each)."""
        for bucket in buckets:
            try:
                self.client.head_bucket(Bucket=bucket)
            except (ClientError, BotoCoreError) as exc:
                raise StorageFailedError(f"s3://{bucket}: {wire.describe(exc)}") from exc

    # -- retries ---------------------------------------------------------------------

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        cfg = self.settings
        deadline = self._clock() + cfg.retry_budget_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation()
            except (
                ObjectConflictError,
                StorageFailedError,
                ObjectNotFoundError,
                ObjectTooLargeError,
            ):
                raise
            except (ClientError, BotoCoreError) as exc:
                delay = _jitter.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt))
                out_of_budget = attempt >= cfg.max_attempts or self._clock() + delay > deadline
                if not wire.is_transient(exc) or out_of_budget:
                    tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
                    raise StorageFailedError(f"{what}: {wire.describe(exc)} {tries}") from exc
                self._sleep(delay)


def _version_shown(version: object) -> str:
    if not version or version == "null":
        return "an unversioned object (is the bucket versioned?)"
    return f"version {version}"


def _is_missing(exc: ClientError, *, version_id: str | None) -> bool:
    """Whether a GET's refusal means the object (or the version asked for) is not there."""
    if wire.error_code(exc) in _NOT_FOUND or wire.http_status(exc) == 404:
        return True
    # AWS answers a version id it cannot resolve (one it never issued) with 400
    # InvalidArgument, "Invalid version id specified", not 404 NoSuchVersion. Only a
    # GET naming a version can mean that; InvalidArgument stays a failure otherwise.
    if version_id is None or wire.error_code(exc) != "InvalidArgument":
        return False
    error = exc.response.get("Error", {})
    names_version = str(error.get("ArgumentName", "")).lower() == "versionid"
    return names_version or "version" in str(error.get("Message", "")).lower()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
