"""S3Store (the Store port) against the real SeaweedFS: a request's images and the audit
record naming them, uploaded side by side on a first attempt and after the images on a
retry (where an earlier attempt's object may be adopted)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from tests.integration.s3_support import storage_settings
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.messages import GenerationRequest, ImageFormat
from zimage_pipeline.ports import EncodedImage
from zimage_pipeline.storage import (
    ObjectConflictError,
    ObjectStore,
    audit_record_key,
    image_key,
)
from zimage_pipeline.wiring.outputs import S3Store

pytestmark = pytest.mark.integration

CREATED = datetime(2026, 11, 22, 8, 30, tzinfo=UTC)


def request(request_id: str) -> GenerationRequest:
    body = {"request_id": request_id, "on_behalf_of": "alice", "prompt": "a lighthouse"}
    return decode_request(json.dumps(body).encode())


def images(n: int) -> list[EncodedImage]:
    return [EncodedImage(f"png {i} ".encode() * 999, ImageFormat.PNG, 64, 64, i) for i in range(n)]


def stored_record(store: ObjectStore, key: str) -> dict[str, object]:
    return dict(json.loads(store.get_object(key)))


@pytest.mark.parametrize("first_attempt", [True, False])
def test_record_names_every_image_with_its_digest(prefix: str, first_attempt: bool) -> None:
    objects = ObjectStore(storage_settings())
    outputs = S3Store(objects, prefix=prefix, presign_ttl_s=0).store(
        request=request("r-1"),
        created_at=CREATED,
        images=images(3),
        audit_record={"model": {"name": "tiny"}},
        first_attempt=first_attempt,
    )
    named = [
        {"key": r.key, "sha256": hashlib.sha256(img.data).hexdigest(), "bytes": len(img.data)}
        for r, img in zip(outputs.images, images(3), strict=True)
    ]
    assert [r.key for r in outputs.images] == [
        image_key(prefix, CREATED, "r-1", i, "png") for i in range(3)
    ]
    assert stored_record(objects, outputs.audit_record_key)["objects"] == named
    assert sorted(objects.list_keys(prefix + "/")) == sorted(
        [*(r.key for r in outputs.images), outputs.audit_record_key]
    )


@pytest.mark.parametrize("first_attempt", [True, False])
def test_earlier_attempts_object_is_adopted_and_named_by_the_record(
    prefix: str, first_attempt: bool
) -> None:
    objects = ObjectStore(storage_settings())
    earlier = b"an earlier attempt's bytes (another C2PA signing time)"
    key = image_key(prefix, CREATED, "r-2", 0, "png")
    objects.put_object(
        key, earlier, content_type="image/png", metadata={"request-id": "r-2", "seed": "0"}, tags={}
    )
    outputs = S3Store(objects, prefix=prefix, presign_ttl_s=0).store(
        request=request("r-2"),
        created_at=CREATED,
        images=images(1),
        audit_record={},
        first_attempt=first_attempt,
    )
    adopted = hashlib.sha256(earlier).hexdigest()
    assert [r.sha256 for r in outputs.images] == [adopted]
    record = stored_record(objects, outputs.audit_record_key)
    assert record["objects"] == [{"key": key, "sha256": adopted, "bytes": len(earlier)}]


def test_an_earlier_attempts_record_naming_other_bytes_is_replaced(prefix: str) -> None:
    # The earlier attempt wrote its record beside its uploads (a first attempt does) and
    # died before its second image landed: this retry stores other bytes for that one,
    # and the record must name what is there, not what the dead attempt planned.
    objects = ObjectStore(storage_settings())
    s3 = S3Store(objects, prefix=prefix, presign_ttl_s=0)
    record_key = audit_record_key(prefix, CREATED, "r-3")
    planned = [{"key": image_key(prefix, CREATED, "r-3", 1, "png"), "sha256": "0" * 64}]
    objects.put_json(record_key, {"objects": planned}, metadata={"request-id": "r-3"}, tags={})
    outputs = s3.store(
        request=request("r-3"),
        created_at=CREATED,
        images=images(2),
        audit_record={"attempt": 2},
        first_attempt=False,
    )
    record = stored_record(objects, record_key)
    assert record["attempt"] == 2
    assert record["objects"] == [
        {"key": r.key, "sha256": r.sha256, "bytes": r.size} for r in outputs.images
    ]
    assert outputs.audit_record_key == record_key


def test_another_requests_object_under_the_key_is_a_conflict(prefix: str) -> None:
    objects = ObjectStore(storage_settings())
    key = image_key(prefix, CREATED, "r-4", 0, "png")
    objects.put_object(
        key, b"not ours", content_type="image/png", metadata={"request-id": "x"}, tags={}
    )
    with pytest.raises(ObjectConflictError, match="another request"):
        S3Store(objects, prefix=prefix, presign_ttl_s=0).store(
            request=request("r-4"), created_at=CREATED, images=images(1), audit_record={}
        )
