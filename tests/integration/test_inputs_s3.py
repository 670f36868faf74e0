"""Input images read through the real ObjectStore from SeaweedFS (inputs/fetch.py): a
version-pinned read, a version the store does not have, an object over max_bytes refused
from its Content-Length without its body being read, a checksum mismatch, and keys
outside the grant (or not plain) refused without a single GET, though the object is
there."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.integration.s3_support import storage_settings
from zimage_pipeline.errors import InvalidRequestError, RequestRejectedError
from zimage_pipeline.inputs.decode import InputLimits
from zimage_pipeline.inputs.fetch import read_input
from zimage_pipeline.inputs.model import parse_grant
from zimage_pipeline.messages import ImageRef
from zimage_pipeline.storage import ObjectStore

pytestmark = pytest.mark.integration

RED, BLUE = (200, 30, 30), (30, 30, 200)
LIMITS = InputLimits()


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _CountingBody:
    def __init__(self, body: Any, client: CountingClient) -> None:
        self._body, self._client = body, client

    def read(self, amount: int | None = None) -> bytes:
        chunk: bytes = self._body.read(amount)
        self._client.bytes_read += len(chunk)
        return chunk

    def close(self) -> None:
        self._body.close()


class CountingClient:
    """The real boto3 client, counting the GETs made and the body bytes read."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gets: list[dict[str, Any]] = []
        self.bytes_read = 0

    def get_object(self, **params: Any) -> Any:
        self.gets.append(params)
        response = self._client.get_object(**params)
        response["Body"] = _CountingBody(response["Body"], self)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore(storage_settings())


@pytest.fixture
def counted(store: ObjectStore) -> tuple[ObjectStore, CountingClient]:
    client = CountingClient(store.client)
    return ObjectStore(store.settings, client=client), client  # type: ignore[arg-type]


@pytest.fixture
def versioned(store: ObjectStore) -> Iterator[str]:
    """A private bucket with versioning on, emptied (every version) and removed after."""
    bucket = f"zimage-test-inputs-{uuid.uuid4().hex[:10]}"
    store.client.create_bucket(Bucket=bucket)
    store.client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    yield bucket
    listed = store.client.list_object_versions(Bucket=bucket)
    for version in listed.get("Versions", []) + listed.get("DeleteMarkers", []):
        store.client.delete_object(
            Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"]
        )
    store.client.delete_bucket(Bucket=bucket)


def put(store: ObjectStore, key: str, data: bytes, bucket: str | None = None) -> str | None:
    response = store.client.put_object(Bucket=bucket or store.settings.bucket, Key=key, Body=data)
    return response.get("VersionId")


def test_a_pinned_version_is_read_not_the_newest(store: ObjectStore, versioned: str) -> None:
    first = put(store, "cms/packshot.png", png(RED), versioned)
    put(store, "cms/packshot.png", png(BLUE), versioned)
    assert first is not None
    grants = [parse_grant(f"{versioned}/cms/")]

    def read(version_id: str | None, data: bytes) -> tuple[int, int, int]:
        ref = ImageRef(
            bucket=versioned, key="cms/packshot.png", version_id=version_id, sha256=sha(data)
        )
        decoded = read_input(store, ref, grants=grants, limits=LIMITS, what="init_image")
        pixel: tuple[int, int, int] = decoded.image.getpixel((0, 0))
        return pixel

    assert read(first, png(RED)) == RED
    assert read(None, png(BLUE)) == BLUE
    # The pin holds: the newest bytes' checksum does not match the pinned version.
    with pytest.raises(InvalidRequestError, match=r"^init_image: .* has SHA-256"):
        read(first, png(BLUE))


def test_a_version_the_store_does_not_have_is_invalid_naming_the_field(
    store: ObjectStore, versioned: str
) -> None:
    put(store, "cms/packshot.png", png(RED), versioned)
    missing = "0" * 32
    ref = ImageRef(
        bucket=versioned, key="cms/packshot.png", version_id=missing, sha256=sha(png(RED))
    )
    with pytest.raises(InvalidRequestError) as refused:
        read_input(store, ref, grants=[parse_grant(versioned)], limits=LIMITS, what="init_image")
    assert str(refused.value) == (
        f"init_image: s3://{versioned}/cms/packshot.png (version {missing}) not found"
    )


def test_a_version_pinned_in_an_unversioned_bucket_is_not_found(
    store: ObjectStore, prefix: str
) -> None:
    """Found by a probe: a store without versioning ignores the VersionId and returns the
    current object, and the request ran (and its trail named a version never read). The
    version the store answers with must be the one asked for."""
    key = f"{prefix}/in/packshot.png"
    put(store, key, png(RED))
    ref = ImageRef(
        bucket=store.settings.bucket, key=key, version_id="3jfkdls93jfk", sha256=sha(png(RED))
    )
    grants = [parse_grant(f"{store.settings.bucket}/{prefix}/in/")]
    with pytest.raises(InvalidRequestError) as refused:
        read_input(store, ref, grants=grants, limits=LIMITS, what="init_image")
    assert str(refused.value).startswith(
        f"init_image: {ref.uri()} (version 3jfkdls93jfk) not found"
    )
    unpinned = ImageRef(bucket=store.settings.bucket, key=key, sha256=sha(png(RED)))
    assert read_input(store, unpinned, grants=grants, limits=LIMITS, what="init_image").width


def test_an_object_over_max_bytes_is_refused_without_reading_its_body(
    store: ObjectStore, counted: tuple[ObjectStore, CountingClient], prefix: str
) -> None:
    data = png(RED) + bytes(256 * 1024)  # a PNG with 256 KiB of trailing junk
    key = f"{prefix}/in/big.png"
    put(store, key, data)
    reader, client = counted
    ref = ImageRef(bucket=store.settings.bucket, key=key, sha256=sha(data))
    limits = InputLimits(max_bytes=10_000)
    grants = [parse_grant(f"{store.settings.bucket}/{prefix}/in/")]
    with pytest.raises(InvalidRequestError, match=r"is over 10000 bytes \(inputs.max_bytes\)"):
        read_input(reader, ref, grants=grants, limits=limits, what="init_image")
    assert len(client.gets) == 1 and client.bytes_read == 0  # its Content-Length sufficed


def test_a_checksum_mismatch_is_invalid_naming_the_field(store: ObjectStore, prefix: str) -> None:
    key = f"{prefix}/in/packshot.png"
    put(store, key, png(RED))
    ref = ImageRef(bucket=store.settings.bucket, key=key, sha256=sha(png(BLUE)))
    grants = [parse_grant(f"{store.settings.bucket}/{prefix}/in/")]
    with pytest.raises(InvalidRequestError) as refused:
        read_input(store, ref, grants=grants, limits=LIMITS, what="init_image")
    message = str(refused.value)
    assert message.startswith(f"init_image: {ref.uri()} has SHA-256 {sha(png(RED))[:12]}")
    assert f"not the {sha(png(BLUE))[:12]}... the request states" in message


def test_a_key_outside_the_grant_is_never_read(
    store: ObjectStore, counted: tuple[ObjectStore, CountingClient], prefix: str
) -> None:
    bucket, data = store.settings.bucket, png(RED)
    outside = f"{prefix}/elsewhere/packshot.png"
    put(store, outside, data)
    assert store.get_object(outside, bucket=bucket) == data  # it is there to be read
    reader, client = counted
    grants = [parse_grant(f"{bucket}/{prefix}/in/")]
    # A sibling folder whose name starts like the granted one is outside it too.
    for key in (outside, f"{prefix}/inbox/packshot.png"):
        put(store, key, data)
        ref = ImageRef(bucket=bucket, key=key, sha256=sha(data))
        with pytest.raises(RequestRejectedError) as refused:
            read_input(reader, ref, grants=grants, limits=LIMITS, what="init_image")
        assert refused.value.reason == "NOT_AUTHORIZED"
        assert str(refused.value).startswith(f"init_image: s3://{bucket}/{key} is outside")
    assert client.gets == []


def test_keys_that_are_not_plain_are_refused_before_any_get(
    store: ObjectStore, counted: tuple[ObjectStore, CountingClient], prefix: str
) -> None:
    """S3-compatible stores and proxies normalise paths (the local SeaweedFS serves `a//b`
    as `a/b`; others resolve `..`): such a key could name another object than the one the
    grant was judged on. Refused unread, though each string starts with the granted
    folder (model_construct: a reference that skipped the contract's validation)."""
    bucket, data = store.settings.bucket, png(RED)
    put(store, f"{prefix}/elsewhere/packshot.png", data)
    reader, client = counted
    grants = [parse_grant(f"{bucket}/{prefix}/in/")]
    for key in (f"{prefix}/in/../elsewhere/packshot.png", f"{prefix}/in//packshot.png"):
        ref = ImageRef.model_construct(bucket=bucket, key=key, version_id=None, sha256=sha(data))
        with pytest.raises(InvalidRequestError, match=r"^init_image\.key: "):
            read_input(reader, ref, grants=grants, limits=LIMITS, what="init_image")
    assert client.gets == []
