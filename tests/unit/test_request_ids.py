"""One request-id alphabet everywhere (ids.py), and ids written into object keys with an
injective percent-encoding (issue 14, section 2: `cms:asset:42` was accepted by the
schema and then refused by storage)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from zimage_pipeline.decoding import peek_request_id
from zimage_pipeline.ids import (
    KEY_SAFE_CHARACTERS,
    is_request_id,
    key_segment,
    request_id_of_segment,
)
from zimage_pipeline.messages import CancelRequest, GenerationRequest
from zimage_pipeline.storage import (
    InvalidKeyError,
    audit_record_key,
    image_key,
    request_prefix,
    safe_id,
    safe_segment,
)
from zimage_pipeline.storage.s3 import checked_key

WHEN = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
# Every character an id may hold, a few it may not, and the escape character itself.
ID_CHARACTERS = st.text(alphabet="aZ09._:-%/ é\x00", min_size=0, max_size=12)


def schema_accepts(value: str) -> bool:
    try:
        GenerationRequest.model_validate(
            {"request_id": value, "on_behalf_of": "alice", "prompt": "x"}, strict=True
        )
    except ValidationError:
        return False
    return True


def cancel_accepts(value: str) -> bool:
    try:
        CancelRequest.model_validate({"request_id": value}, strict=True)
    except ValidationError:
        return False
    return True


def storage_accepts(value: str) -> bool:
    try:
        safe_id(value)
    except InvalidKeyError:
        return False
    return True


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("cms:asset:42", True),  # a CMS URN: the case that broke
        ("req-1", True),
        ("a.b_c-d:e", True),
        ("A", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("a..b", False),
        ("..", False),
        (":leading", False),
        ("-leading", False),
        (".hidden", False),
        ("_leading", False),
        ("a/b", False),
        ("a b", False),
        ("a%3Ab", False),  # the escape character is never part of an id
        ("é", False),
        ("a\x00", False),
        ("a\n", False),
    ],
)
def test_schema_cancel_storage_and_peek_share_one_alphabet(value: str, valid: bool) -> None:
    assert is_request_id(value) is valid
    assert schema_accepts(value) is valid
    assert cancel_accepts(value) is valid  # a cancel used to accept `..`
    assert storage_accepts(value) is valid  # storage used to refuse `:`
    assert (peek_request_id(json.dumps({"request_id": value}).encode()) == value) is valid


@given(ID_CHARACTERS)
def test_every_check_of_an_id_agrees(value: str) -> None:
    valid = is_request_id(value)
    assert schema_accepts(value) is valid
    assert cancel_accepts(value) is valid
    assert storage_accepts(value) is valid


def test_keys_of_an_id_with_colons_are_percent_encoded() -> None:
    assert key_segment("cms:asset:42") == "cms%3Aasset%3A42"
    assert image_key("zimage", WHEN, "cms:asset:42", 1, "png") == (
        "zimage/2026/03/04/cms%3Aasset%3A42/1.png"
    )
    assert audit_record_key("zimage", WHEN, "cms:asset:42") == (
        "zimage/2026/03/04/cms%3Aasset%3A42/audit.json"
    )
    # Listing and discarding use the same prefix the keys were written under.
    assert request_prefix("zimage", WHEN, "cms:asset:42") == "zimage/2026/03/04/cms%3Aasset%3A42"
    # What the store is asked for passes the store's own key check unchanged.
    key = image_key("zimage", WHEN, "cms:asset:42", 0, "png")
    assert checked_key(key) == key


def test_ids_of_safe_characters_keep_their_keys() -> None:
    """Keys written before the encoding existed are the keys written now."""
    assert image_key("zimage", WHEN, "req-1.a_b", 0, "png") == "zimage/2026/03/04/req-1.a_b/0.png"


@given(ID_CHARACTERS, ID_CHARACTERS)
def test_the_encoding_is_injective_and_round_trips(first: str, second: str) -> None:
    if not (is_request_id(first) and is_request_id(second)):
        return
    segment = key_segment(first)
    assert request_id_of_segment(segment) == first
    assert safe_segment(segment) == segment
    assert set(segment) <= KEY_SAFE_CHARACTERS | set("%0123456789ABCDEF")
    assert (segment == key_segment(second)) is (first == second)


@pytest.mark.parametrize(
    "segment",
    [
        "cms%3aasset",  # lowercase hex: never written
        "%41bc",  # an escaped safe character: never written
        "a%25b",  # an escaped `%`: no id holds one
        "a%",  # a stray escape character
        "a%2Fb",  # decodes to a separator
        "%2E%2E",  # decodes to `..`
    ],
)
def test_only_segments_the_encoding_writes_decode(segment: str) -> None:
    with pytest.raises(ValueError):
        request_id_of_segment(segment)


@pytest.mark.parametrize("segment", ["", ".", "..", "a..b", "-x", ".x", "a/b", "a:b", "a%3ab"])
def test_key_segments_are_checked(segment: str) -> None:
    with pytest.raises(InvalidKeyError):
        safe_segment(segment)


def test_keys_past_the_s3_limit_are_refused() -> None:
    with pytest.raises(InvalidKeyError):
        checked_key("/".join(["x" * 200] * 6))
