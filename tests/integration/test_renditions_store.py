"""S3Store with derived images (renditions) against the real SeaweedFS: each stored beside
its image under `{index}/{name}.{ext}` with the digest the store returns, listed in the
audit record, adopted from an earlier attempt like an image, and discarded with the
request."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.integration.s3_support import storage_settings
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.messages import GenerationRequest, ImageFormat
from zimage_pipeline.ports import EncodedDerived, EncodedImage
from zimage_pipeline.storage import ObjectConflictError, ObjectStore, image_key
from zimage_pipeline.storage.keys import rendition_key
from zimage_pipeline.wiring.outputs import S3Store

pytestmark = pytest.mark.integration

CREATED = datetime(2026, 11, 22, 8, 30, tzinfo=UTC)


def request(request_id: str) -> GenerationRequest:
    body = {"request_id": request_id, "on_behalf_of": "alice", "prompt": "a lighthouse"}
    return decode_request(json.dumps(body).encode())


def images(n: int) -> list[EncodedImage]:
    return [EncodedImage(f"png {i} ".encode() * 999, ImageFormat.PNG, 64, 64, i) for i in range(n)]


def rendition(source_index: int, name: str, fmt: str) -> EncodedDerived:
    data = f"{fmt} {name} of {source_index} ".encode() * 99
    return EncodedDerived(source_index, name, data, fmt, 32, 32, "renditions", {"preset": name})


DERIVED = [
    rendition(0, "thumb", "webp"),
    rendition(0, "social", "jpeg"),
    rendition(1, "thumb", "avif"),
]
EXTENSIONS = {"webp": "webp", "jpeg": "jpg", "avif": "avif"}
CONTENT_TYPES = {"webp": "image/webp", "jpeg": "image/jpeg", "avif": "image/avif"}


def stored_record(store: ObjectStore, key: str) -> dict[str, Any]:
    return dict(json.loads(store.get_object(key)))


@pytest.mark.parametrize("first_attempt", [True, False])
def test_renditions_are_stored_beside_their_images_and_named_by_the_record(
    prefix: str, first_attempt: bool
) -> None:
    objects = ObjectStore(storage_settings())
    store = S3Store(objects, prefix=prefix, presign_ttl_s=0)

    outputs = store.store(
        request=request("rr-1"),
        created_at=CREATED,
        images=images(2),
        audit_record={"model": {"name": "tiny"}},
        first_attempt=first_attempt,
        derived=DERIVED,
    )

    expected_keys = [
        rendition_key(prefix, CREATED, "rr-1", d.source_index, d.name, EXTENSIONS[d.format])
        for d in DERIVED
    ]
    assert [r.key for r in outputs.derived] == expected_keys
    assert expected_keys[0].endswith("/rr-1/0/thumb.webp")
    for ref, image in zip(outputs.derived, DERIVED, strict=True):
        stored = objects.get_object(ref.key)
        assert stored == image.data
        assert ref.sha256 == hashlib.sha256(stored).hexdigest() and ref.size == len(stored)
        head = objects.client.head_object(Bucket=ref.bucket, Key=ref.key)
        assert head["ContentType"] == CONTENT_TYPES[image.format]
        assert head["Metadata"]["plugin"] == "renditions"
        assert head["Metadata"]["source-index"] == str(image.source_index)
        assert head["Metadata"]["rendition"] == image.name
        assert head["Metadata"]["request-id"] == "rr-1"

    record = stored_record(objects, outputs.audit_record_key)
    assert record["objects"][2:] == [
        {
            "key": ref.key,
            "sha256": ref.sha256,
            "bytes": ref.size,
            "source_index": image.source_index,
            "rendition": image.name,
            "plugin": "renditions",
        }
        for ref, image in zip(outputs.derived, DERIVED, strict=True)
    ]
    assert [o["key"] for o in record["objects"][:2]] == [r.key for r in outputs.images]
    assert sorted(objects.list_keys(prefix + "/")) == sorted(
        [*(r.key for r in outputs.images), *expected_keys, outputs.audit_record_key]
    )


def test_discard_deletes_the_renditions_with_the_rest(prefix: str) -> None:
    objects = ObjectStore(storage_settings())
    store = S3Store(objects, prefix=prefix, presign_ttl_s=0)
    outputs = store.store(
        request=request("rr-2"),
        created_at=CREATED,
        images=images(2),
        audit_record={},
        first_attempt=True,
        derived=DERIVED,
    )

    deleted = store.discard(request_id="rr-2", created_at=CREATED)

    assert {r.key for r in outputs.derived} <= set(deleted)
    assert len(deleted) == 2 + len(DERIVED) + 1
    assert list(objects.list_keys(prefix + "/")) == []


@pytest.mark.parametrize("first_attempt", [True, False])
def test_an_earlier_attempts_rendition_is_adopted_and_named_by_the_record(
    prefix: str, first_attempt: bool
) -> None:
    objects = ObjectStore(storage_settings())
    earlier = b"an earlier attempt's rendition (another C2PA signing time)"
    key = rendition_key(prefix, CREATED, "rr-3", 1, "thumb", "avif")
    # The source's seed: image 1 of `images(2)` has seed 1.
    objects.put_object(
        key,
        earlier,
        content_type="image/avif",
        metadata={"request-id": "rr-3", "seed": "1"},
        tags={},
    )

    outputs = S3Store(objects, prefix=prefix, presign_ttl_s=0).store(
        request=request("rr-3"),
        created_at=CREATED,
        images=images(2),
        audit_record={},
        first_attempt=first_attempt,
        derived=DERIVED,
    )

    adopted = hashlib.sha256(earlier).hexdigest()
    assert outputs.derived[2].sha256 == adopted
    assert objects.get_object(key) == earlier
    named = {
        o["key"]: o["sha256"] for o in stored_record(objects, outputs.audit_record_key)["objects"]
    }
    assert named[key] == adopted
    assert named[outputs.derived[0].key] == hashlib.sha256(DERIVED[0].data).hexdigest()


def test_another_requests_object_under_a_rendition_key_is_a_conflict(prefix: str) -> None:
    objects = ObjectStore(storage_settings())
    key = rendition_key(prefix, CREATED, "rr-4", 0, "social", "jpg")
    objects.put_object(
        key, b"not ours", content_type="image/jpeg", metadata={"request-id": "x"}, tags={}
    )
    with pytest.raises(ObjectConflictError, match="another request"):
        S3Store(objects, prefix=prefix, presign_ttl_s=0).store(
            request=request("rr-4"),
            created_at=CREATED,
            images=images(1),
            audit_record={},
            derived=[DERIVED[1]],
        )
    # the image itself went up beside it: the failed request's discard takes it away
    assert objects.get_object(image_key(prefix, CREATED, "rr-4", 0, "png")) == images(1)[0].data
