"""Input references name plain S3 objects: bucket names follow S3's rules and keys have no
`.`/`..`/empty segments or control characters, in the contract (INVALID_REQUEST naming
the field), in the JSON Schema, and again in the inputs path before anything is read."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import jsonschema
import pytest
from PIL import Image

from tests.fakes import FakeObjects
from zimage_pipeline import schemas
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.inputs.decode import InputLimits
from zimage_pipeline.inputs.fetch import read_input
from zimage_pipeline.inputs.model import parse_grant
from zimage_pipeline.messages import GenerationRequest, ImageRef

SHA = "0" * 64

BAD_KEYS = {
    "cms/./a.png": "'.' segments",
    "cms/../a.png": "'..' segments",
    "../cms/a.png": "'..' segments",
    "cms/..": "'..' segments",
    "./a.png": "'.' segments",
    "cms//a.png": "empty segments",
    "/cms/a.png": "empty segments",
    "cms/": "empty segments",
    "cms/a\tb.png": "control characters",
    "cms/a\nb.png": "control characters",
    "cms/a\rb.png": "control characters",
    "cms/a\x00b.png": "control characters",
    "cms/a\x1bb.png": "control characters",
    "cms/a\x7fb.png": "control characters",
    "cms/a\x85b.png": "control characters",  # C1: NEL
    "cms/a\x9fb.png": "control characters",
}
GOOD_KEYS = ["cms/a.png", "cms/.../a.png", "cms/a..b.png", "cms/.hidden.png", "cms/Zürich 1.png"]
BAD_BUCKETS = {
    "ab": "at least 3 characters",
    "a" * 64: "at most 63 characters",
    "Zimage-inputs": "lowercase letters",
    "zimage_inputs": "lowercase letters",
    "-zimage": "lowercase letters",
    "zimage.": "lowercase letters",
    "zimage..inputs": "two adjacent dots",
    "192.168.10.4": "IP address",
    "xn--zimage": "'xn--'",
    "sthree-zimage": "'sthree-'",
    "zimage-s3alias": "'-s3alias'",
    "zimage--ol-s3": "'--ol-s3'",
}
GOOD_BUCKETS = ["zimage-inputs", "my.bucket.name", "a1b", "192.168.10.4a", "x" * 63]


def request_body(**ref: str) -> bytes:
    image = {"bucket": "zimage-inputs", "key": "cms/a.png", "sha256": SHA, **ref}
    return json.dumps(
        {
            "request_id": "r1",
            "on_behalf_of": "alice",
            "prompt": "a kitchen",
            "task": "image_to_image",
            "init_image": image,
        }
    ).encode()


@pytest.mark.parametrize(("key", "problem"), BAD_KEYS.items())
def test_keys_that_could_name_something_else_are_invalid_naming_the_field(
    key: str, problem: str
) -> None:
    with pytest.raises(InvalidRequestError, match=f"init_image.key: .*{problem}"):
        decode_request(request_body(key=key))


@pytest.mark.parametrize(("bucket", "problem"), BAD_BUCKETS.items())
def test_bucket_names_follow_s3s_rules_naming_the_field(bucket: str, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"init_image.bucket: .*{problem}"):
        decode_request(request_body(bucket=bucket))


@pytest.mark.parametrize(
    ("bucket", "key"),
    [(b, "cms/a.png") for b in GOOD_BUCKETS] + [("zimage-inputs", k) for k in GOOD_KEYS],
)
def test_plain_names_are_taken(bucket: str, key: str) -> None:
    request = decode_request(request_body(bucket=bucket, key=key))
    assert request.init_image == ImageRef(bucket=bucket, key=key, sha256=SHA)


def test_the_schema_says_what_the_worker_takes() -> None:
    """docs/schemas/ is what clients validate against: the same names pass and fail."""
    schema = json.loads(schemas.render(GenerationRequest))
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/$defs/ImageRef", "$defs": schema["$defs"]}
    )
    cases = [(b, "cms/a.png", False) for b in BAD_BUCKETS] + [
        ("zimage-inputs", k, False) for k in BAD_KEYS
    ]
    cases += [(b, "cms/a.png", True) for b in GOOD_BUCKETS]
    cases += [("zimage-inputs", k, True) for k in GOOD_KEYS]
    for bucket, key, valid in cases:
        ref = {"bucket": bucket, "key": key, "sha256": SHA}
        assert validator.is_valid(ref) is valid, (bucket, key)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    return buffer.getvalue()


class SpyingObjects(FakeObjects):
    def __init__(self) -> None:
        super().__init__()
        self.read: list[str] = []

    def get_object(self, key: str, **kwargs: Any) -> bytes:
        self.read.append(key)
        return super().get_object(key, **kwargs)


@pytest.mark.parametrize(
    ("bucket", "key", "field"),
    [
        ("zimage-inputs", "cms/../secret.png", "init_image.key"),
        ("zimage-inputs", "cms//secret.png", "init_image.key"),
        ("zimage-inputs", "cms/secret\x85.png", "init_image.key"),
        ("zimage..inputs", "cms/secret.png", "init_image.bucket"),
    ],
)
def test_the_inputs_path_checks_names_again_before_reading(
    bucket: str, key: str, field: str
) -> None:
    """A reference that skipped the contract's validation (model_construct here) is
    refused before the grant is judged or the store is asked, though the grant's folder
    is a string prefix of the key and the object is there."""
    data = png()
    objects = SpyingObjects()
    objects.buckets[bucket] = {key: data}
    ref = ImageRef.model_construct(
        bucket=bucket, key=key, version_id=None, sha256=hashlib.sha256(data).hexdigest()
    )
    grants = [parse_grant("zimage-inputs/cms/")]
    with pytest.raises(InvalidRequestError, match=f"^{field}: "):
        read_input(objects, ref, grants=grants, limits=InputLimits(), what="init_image")
    assert objects.read == []
