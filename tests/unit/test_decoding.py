"""The request decoder: every bad input is an InvalidRequestError naming the problem."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zimage_pipeline.decoding import (
    decode_cancel,
    decode_request,
    nesting_depth,
    peek_request_id,
    read_json_object,
)
from zimage_pipeline.errors import Disposition, InvalidRequestError
from zimage_pipeline.messages import DEFAULT_STEPS, ImageFormat, Priority


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"request_id": "req-1", "on_behalf_of": "alice", "prompt": "a red fox"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_minimal_request_gets_the_documented_defaults() -> None:
    request = decode_request(body())
    assert (request.width, request.height) == (1024, 1024)
    assert request.steps == DEFAULT_STEPS
    assert request.guidance_scale == 0.0
    assert request.seed is None
    assert request.num_images == 1
    assert request.format is ImageFormat.PNG
    assert request.priority is Priority.STANDARD


def test_chinese_and_english_prompts_are_first_class() -> None:
    request = decode_request(body(prompt="一只在雪地里的红狐狸, photorealistic"))
    assert request.prompt.startswith("一只")


def test_full_request_round_trips() -> None:
    request = decode_request(
        body(
            negative_prompt="blurry",
            width=768,
            height=512,
            steps=6,
            guidance_scale=1.5,
            seed=42,
            num_images=2,
            format="webp",
            quality=80,
            priority="interactive",
            expires_at="2030-01-01T00:00:00+00:00",
            labels={"cms.asset_id": "A-1", "locale": "de-CH"},
        )
    )
    assert request.format is ImageFormat.WEBP and request.priority is Priority.INTERACTIVE
    assert request.labels == {"cms.asset_id": "A-1", "locale": "de-CH"}


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid UTF-8"),
        (b"[]", "expected a JSON object"),
        (body(request_id=...), "request_id: Field required"),
        (body(width="1024"), "width"),
        (body(width=-16), "width"),
        (body(width=1000), "width: Input should be a multiple of 16"),
        (body(height=100000), "height"),
        (body(steps=0), "steps"),
        (body(num_images=100), "num_images"),
        (body(seed=-1), "seed"),
        (body(format="gif"), "format"),
        (body(priority="urgent"), "priority"),
        (body(prompt=""), "prompt"),
        (body(prompt="   "), "prompt: Value error, must not be blank"),
        (body(prompt="x" * 4001), "prompt"),
        (body(prompt="a\x00b"), "prompt: Value error, must not contain control characters"),
        (body(request_id="../../etc"), "request_id"),
        (body(request_id="a/b"), "request_id"),
        (body(request_id="a..b"), "request_id: Value error, must not contain '..'"),
        (body(request_id="x" * 129), "request_id"),
        (body(expires_at="2030-01-01T00:00:00"), "expires_at"),
        (body(labels={"Bad Key": "v"}), "labels"),
        (body(labels={f"k{i}": "v" for i in range(17)}), "labels"),
        (body(colour="red", size=3), "unknown field(s): colour, size"),
        (b'{"request_id":"a","on_behalf_of":"x","prompt":"p","guidance_scale":NaN}', "NaN"),
        (b'{"request_id":"a","on_behalf_of":"x","prompt":"p","guidance_scale":1e999}', "guidance"),
        (body(guidance_scale=True), "guidance_scale"),
        (body(schema="zimage.request/v2"), "schema"),
        # A NUL would not fit PostgreSQL's text columns, where labels are indexed.
        (body(labels={"a": "x\x00y"}), "labels.a: Value error, must not contain control"),
        (body(labels={"a": "line\nbreak"}), "labels.a: Value error, must not contain control"),
        (body(labels={"a": "c1\x85"}), "labels.a: Value error, must not contain control"),
        (body(prompt="a \x9b cat"), "prompt: Value error, must not contain control characters"),
        # Invisible characters beyond category Cf: a grapheme joiner, variation selectors.
        (body(prompt="\u034f\ufe0f \u3164"), "prompt: Value error, must not be blank"),
        # `schema_` is the Python name of `schema`, not a second spelling on the wire.
        (body(schema_="zimage.request/v1"), "unknown field(s): schema_"),
        (
            b'{"request_id":"a","on_behalf_of":"x","prompt":"p","seed":' + b"9" * 4400 + b"}",
            "an integer of 4400 digits; at most 20",
        ),
        # JSON's "\ud800" escapes encode no character: refused naming the field.
        (
            b'{"request_id":"a","on_behalf_of":"x","prompt":"tea\\ud800pot"}',
            "prompt: a lone surrogate escape is not text",
        ),
        (
            b'{"request_id":"a","on_behalf_of":"x","prompt":"p","labels":{"k":"\\ude00"}}',
            "labels.k: a lone surrogate escape is not text",
        ),
        (
            body(
                task="image_to_image",
                strength=0.5,
                init_image={"bucket": "cms", "key": "a.png", "version_id": "v\x001"},
            ),
            "init_image.version_id",
        ),
    ],
)
def test_bad_input_names_the_problem(raw: bytes, named: str) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        decode_request(raw)
    assert named in str(excinfo.value)
    assert excinfo.value.reason == "INVALID_REQUEST"
    assert excinfo.value.disposition is Disposition.REJECT


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidRequestError, match="exceeds the limit of 1000"):
        decode_request(body(prompt="x" * 2000), max_bytes=1000)


def test_error_text_never_echoes_the_prompt() -> None:
    secret_prompt = "confidential launch of product Zeta " * 200
    with pytest.raises(InvalidRequestError) as excinfo:
        decode_request(body(prompt=secret_prompt))
    assert "confidential" not in str(excinfo.value)


def test_cancel_message() -> None:
    assert decode_cancel(b'{"request_id": "req-9"}').request_id == "req-9"
    with pytest.raises(InvalidRequestError, match="unknown field"):
        decode_cancel(b'{"request_id": "req-9", "force": true}')


def test_peek_request_id_only_returns_safe_ids() -> None:
    assert peek_request_id(body(width="x")) == "req-1"
    assert peek_request_id(body(request_id="../x")) is None
    assert peek_request_id(b"garbage") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        decode_request(raw)
    except InvalidRequestError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "request_id",
                "on_behalf_of",
                "prompt",
                "width",
                "height",
                "steps",
                "seed",
                "num_images",
                "format",
                "labels",
                "guidance_scale",
                "expires_at",
                "extra",
            ]
        ),
        json_values,
    )
)
def test_fuzz_json_objects_are_valid_or_named(document: dict[str, Any]) -> None:
    raw = json.dumps(document, allow_nan=True).encode()
    try:
        request = decode_request(raw)
    except InvalidRequestError as exc:
        assert str(exc)
    else:
        assert request.width % 16 == 0 and request.height % 16 == 0
        assert "extra" not in document


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b'{"a": 1}', 1),
        (b'{"labels": {"k": "v"}}', 2),
        (rb'{"a": "[[[{{{", "b": ["\"[", {"c": []}]}', 4),  # brackets in strings skipped
        (b'"unterminated [[[', 0),
        (b"[" * 40 + b"]" * 40, 40),
    ],
)
def test_nesting_depth_counts_brackets_outside_strings(body: bytes, depth: int) -> None:
    assert nesting_depth(body.decode()) == depth


def test_deeply_nested_json_is_a_clear_invalid_request_not_a_recursion_error() -> None:
    # 40 KB of nested arrays: under the size limit, deeper than any parser recursion.
    body = b'{"request_id": "deep-1", "labels": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    with pytest.raises(InvalidRequestError, match="nested 20001 levels deep"):
        decode_request(body)
    assert peek_request_id(body) is None
    assert read_json_object(body) is None


def test_depth_scan_is_linear_on_hostile_quotes() -> None:
    # Thousands of escaped quotes with no closing one: a scan that retried every quote as
    # the start of a string would be quadratic (seconds); this must stay instant.
    body = ('["' + '\\"' * 30000).encode()
    started = time.perf_counter()
    assert read_json_object(body) is None
    assert time.perf_counter() - started < 0.5


REF = {"bucket": "zimage-inputs", "key": "cms/packshot.png", "sha256": "a" * 64}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"task": "image_to_image"}, "init_image: image_to_image needs an init image"),
        ({"init_image": REF}, "init_image: text_to_image takes no init image"),
        ({"task": "inpaint", "init_image": REF}, "mask_image: inpaint needs a mask"),
        (
            {"task": "image_to_image", "init_image": REF, "mask_image": REF},
            "mask_image: image_to_image takes no mask (only inpaint does)",
        ),
        ({"strength": 0.4}, "strength: text_to_image takes no strength"),
        ({"task": "image_to_image", "init_image": REF, "strength": 0}, "strength"),
    ],
)
def test_a_tasks_inputs_are_checked_naming_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(named)):
        decode_request(body(**fields))


def test_each_task_with_its_inputs_decodes() -> None:
    edit = decode_request(body(task="image_to_image", init_image=REF, strength=0.3))
    assert (edit.task.value, edit.strength, edit.init_image is not None) == (
        "image_to_image",
        0.3,
        True,
    )
    repaint = decode_request(body(task="inpaint", init_image=REF, mask_image=REF))
    assert repaint.mask_image is not None and repaint.strength is None
    assert repaint.repaint_strength == 0.6  # the default of the image tasks


@pytest.mark.parametrize("exclude_none", [True, False])
def test_a_request_serialized_with_its_defaults_decodes_again(exclude_none: bool) -> None:
    """What a client that builds its message from this model sends (every default
    included) is a valid request: no default may trip a rule of another field."""
    request = decode_request(body())
    sent = request.model_dump_json(by_alias=True, exclude_none=exclude_none).encode()
    assert decode_request(sent) == request


def test_an_escaped_surrogate_pair_is_one_character_and_decodes() -> None:
    raw = b'{"request_id":"a","on_behalf_of":"x","prompt":"\\ud83d\\ude00 a fox"}'
    assert decode_request(raw).prompt == "\U0001f600 a fox"
