"""ObjectStore against the real SeaweedFS: checksums, no overwrite, crash retries, presigning."""

from __future__ import annotations

import base64
import hashlib
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError

from tests.integration.s3_support import storage_settings
from zimage_pipeline.errors import Disposition
from zimage_pipeline.storage import (
    ObjectConflictError,
    ObjectStore,
    StorageFailedError,
    image_key,
)

pytestmark = pytest.mark.integration

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore(storage_settings())


def key_for(prefix: str, request_id: str = "req-1", index: int = 0) -> str:
    return image_key(prefix, datetime(2026, 11, 21, 23, 59, tzinfo=UTC), request_id, index, "png")


def test_upload_sends_and_verifies_sha256(store: ObjectStore, prefix: str) -> None:
    key = key_for(prefix)
    stored = store.put_object(
        key,
        PNG_BYTES,
        content_type="image/png",
        metadata={"request-id": "req-1", "user": "Rédaction Zürich", "seed": "42"},
        tags={"request-id": "req-1", "model": "Z-Image-Turbo@abc", "user": "Rédaction Zürich"},
    )

    assert stored.key == key
    assert stored.sha256 == hashlib.sha256(PNG_BYTES).hexdigest()
    assert stored.size == len(PNG_BYTES)
    head = store.client.head_object(Bucket=stored.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(PNG_BYTES).digest()).decode()
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["user"] == "R%C3%A9daction Z%C3%BCrich"
    assert head["Metadata"]["sha256"] == stored.sha256
    tags = store.client.get_object_tagging(Bucket=stored.bucket, Key=key)["TagSet"]
    # Tag values keep S3's portable character set; others become "_".
    assert {t["Key"]: t["Value"] for t in tags} == {
        "request-id": "req-1",
        "model": "Z-Image-Turbo@abc",
        "user": "R_daction Z_rich",
    }


def test_damaged_upload_is_refused_by_the_store(store: ObjectStore, prefix: str) -> None:
    """The checksum is really checked: a body that does not match it is refused."""
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    with pytest.raises(Exception, match="BadDigest"):
        store.client.put_object(
            Bucket=store.settings.bucket, Key=key_for(prefix), Body=PNG_BYTES, ChecksumSHA256=wrong
        )


def test_overwrite_with_other_content_is_refused(store: ObjectStore, prefix: str) -> None:
    key = key_for(prefix)
    store.put_object(key, PNG_BYTES, content_type="image/png", metadata={}, tags={})

    with pytest.raises(ObjectConflictError) as info:
        store.put_object(key, PNG_BYTES + b"x", content_type="image/png", metadata={}, tags={})

    assert info.value.reason == "OBJECT_CONFLICT"
    assert store.get_object(key) == PNG_BYTES


def test_overwrite_refused_without_conditional_writes(prefix: str) -> None:
    """The HEAD-then-PUT path for stores that ignore If-None-Match."""
    store = ObjectStore(storage_settings(conditional_writes=False))
    key = key_for(prefix)
    first = store.put_object(key, PNG_BYTES, content_type="image/png", metadata={}, tags={})
    again = store.put_object(key, PNG_BYTES, content_type="image/png", metadata={}, tags={})
    assert again.sha256 == first.sha256
    with pytest.raises(ObjectConflictError):
        store.put_object(key, b"different", content_type="image/png", metadata={}, tags={})
    assert store.get_object(key) == PNG_BYTES


def test_retry_after_crash_lands_on_the_same_key(prefix: str) -> None:
    """Given a worker that uploaded and died before recording it, when the redelivered
    request is handled by a fresh process, the same key is computed and the identical
    upload counts as success: one object, not two."""
    created_at = datetime(2026, 11, 21, 23, 59, 30, tzinfo=UTC)  # as recorded in the ledger
    first_process = ObjectStore(storage_settings())
    first = first_process.put_object(
        image_key(prefix, created_at, "req-crash", 0, "png"),
        PNG_BYTES,
        content_type="image/png",
        metadata={"request-id": "req-crash"},
        tags={},
    )
    del first_process  # the crash: nothing about the upload was remembered

    second_process = ObjectStore(storage_settings())
    again = second_process.put_object(
        image_key(prefix, created_at, "req-crash", 0, "png"),
        PNG_BYTES,
        content_type="image/png",
        metadata={"request-id": "req-crash"},
        tags={},
    )

    assert again.key == first.key
    assert again.sha256 == first.sha256
    assert list(second_process.list_keys(f"{prefix}/")) == [first.key]


def test_lost_response_is_retried_and_recognised(store: ObjectStore, prefix: str) -> None:
    """The PUT lands but its response is lost (read timeout): the retry meets the existing
    object, compares checksums and succeeds."""
    calls: list[str] = []

    def lose_first_response(**_: Any) -> None:
        calls.append("put")
        if len(calls) == 1:
            raise ReadTimeoutError(endpoint_url="s3")

    store.client.meta.events.register("after-call.s3.PutObject", lose_first_response)
    stored = store.put_object(
        key_for(prefix), PNG_BYTES, content_type="image/png", metadata={}, tags={}
    )
    assert calls == ["put", "put"]
    assert stored.sha256 == hashlib.sha256(PNG_BYTES).hexdigest()
    assert store.get_object(stored.key) == PNG_BYTES


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def test_persistent_5xx_ends_in_storage_failed(prefix: str) -> None:
    sleeps: list[float] = []
    store = ObjectStore(storage_settings(max_attempts=4), sleep=sleeps.append)
    body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"

    def unavailable(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, 503, {}, _Raw(body))

    store.client.meta.events.register("before-send.s3.PutObject", unavailable)
    with pytest.raises(StorageFailedError) as info:
        store.put_object(key_for(prefix), PNG_BYTES, content_type="image/png", metadata={}, tags={})

    assert info.value.reason == "STORAGE_FAILED"
    assert info.value.disposition is Disposition.FAIL
    assert "4 attempts" in str(info.value)
    assert len(sleeps) == 3 and all(0 <= s <= 0.05 for s in sleeps)


def test_transient_5xx_then_success(prefix: str) -> None:
    store = ObjectStore(storage_settings(), sleep=lambda _s: None)
    failures = [503, 500]

    def flaky(request: Any, **_: Any) -> AWSResponse | None:
        if failures:
            return AWSResponse(request.url, failures.pop(), {}, _Raw(b"<Error/>"))
        return None

    store.client.meta.events.register("before-send.s3.PutObject", flaky)
    stored = store.put_object(
        key_for(prefix), PNG_BYTES, content_type="image/png", metadata={}, tags={}
    )
    assert not failures
    assert store.get_object(stored.key) == PNG_BYTES


def test_presigned_url_downloads_the_same_bytes(store: ObjectStore, prefix: str) -> None:
    stored = store.put_object(
        key_for(prefix), PNG_BYTES, content_type="image/png", metadata={}, tags={}
    )
    url = store.presign_get(stored.key, 60)
    assert url.startswith("http://127.0.0.1:8333/")
    assert "X-Amz-Expires=60" in url
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback URL
        assert response.read() == PNG_BYTES


def test_put_json_is_canonical_and_idempotent(store: ObjectStore, prefix: str) -> None:
    key = f"{prefix}/2026/11/21/req-1/audit.json"
    first = store.put_json(key, {"b": 1, "a": "é"})
    again = store.put_json(key, {"a": "é", "b": 1})  # same record, other key order
    assert again.sha256 == first.sha256
    assert store.get_object(key) == '{"a":"é","b":1}'.encode()
