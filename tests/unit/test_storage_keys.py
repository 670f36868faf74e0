"""Object keys come only from sanitized ids; metadata and tags survive S3's header rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError, SSLError
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from zimage_pipeline.cli import app
from zimage_pipeline.errors import Disposition
from zimage_pipeline.ids import request_id_of_segment
from zimage_pipeline.provenance import ProvenanceInfo, mark_image
from zimage_pipeline.storage import (
    InvalidKeyError,
    StorageFailedError,
    anchor_key,
    audit_record_key,
    image_key,
    safe_id,
)
from zimage_pipeline.storage.wire import encode_metadata, encode_tags, is_transient

WHEN = datetime(2026, 1, 2, 23, 30, tzinfo=UTC)


def test_keys_are_deterministic_and_dated_in_utc() -> None:
    assert image_key("zimage", WHEN, "req-1", 0, "png") == "zimage/2026/01/02/req-1/0.png"
    # The same instant seen from another zone is the same key (next day locally).
    local = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert image_key("zimage", local, "req-1", 3, "webp") == "zimage/2026/01/02/req-1/3.webp"
    assert audit_record_key("a/b/", WHEN, "req-1") == "a/b/2026/01/02/req-1/audit.json"
    assert anchor_key("zimage", "audit-anchors", 42) == "zimage/audit-anchors/0000000000000042.json"
    assert image_key("", WHEN, "r", 0, "jpeg") == "2026/01/02/r/0.jpeg"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "a/b",
        "../etc",
        "a..b",
        "-x",
        ".hidden",
        "a b",
        "a\\b",
        "é",
        "a\x00",
        "x" * 129,
    ],
)
def test_unsafe_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidKeyError) as info:
        safe_id(bad)
    assert info.value.disposition is Disposition.REJECT
    assert info.value.reason == "INVALID_ID"


def test_key_inputs_are_checked() -> None:
    with pytest.raises(InvalidKeyError):
        image_key("zimage", WHEN.replace(tzinfo=None), "r", 0, "png")  # naive time
    with pytest.raises(InvalidKeyError):
        image_key("zimage", WHEN, "r", -1, "png")
    with pytest.raises(InvalidKeyError):
        image_key("zimage", WHEN, "r", 0, "exe")
    with pytest.raises(InvalidKeyError):
        image_key("../up", WHEN, "r", 0, "png")


@given(st.text(max_size=200))
def test_no_id_can_escape_its_segment(value: str) -> None:
    try:
        key = image_key("p", WHEN, value, 0, "png")
    except InvalidKeyError:
        return
    segments = key.split("/")
    assert len(segments) == 6 and request_id_of_segment(segments[4]) == value
    assert ".." not in key and "\\" not in key and all(seg for seg in segments)


def test_metadata_is_ascii_and_bounded() -> None:
    assert encode_metadata({"User": "Rédaction Zürich", "seed": "7"}) == {
        "user": "R%C3%A9daction Z%C3%BCrich",
        "seed": "7",
    }
    with pytest.raises(StorageFailedError):
        encode_metadata({"bad key!": "x"})
    with pytest.raises(StorageFailedError):
        encode_metadata({"big": "x" * 3000})


def test_tags_keep_the_portable_character_set() -> None:
    assert encode_tags({"sku": "A/B 1+2", "who": "a&b=c?"}) == "sku=A%2FB+1%2B2&who=a_b%3Dc_"
    with pytest.raises(StorageFailedError):
        encode_tags({f"k{i}": "v" for i in range(11)})


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def test_transient_errors_are_told_apart() -> None:
    assert is_transient(_client_error(503, "ServiceUnavailable"))
    assert is_transient(_client_error(500, "InternalError"))
    assert is_transient(_client_error(429, "SlowDown"))
    assert is_transient(_client_error(400, "BadDigest"))
    assert is_transient(EndpointConnectionError(endpoint_url="x"))
    assert is_transient(ReadTimeoutError(endpoint_url="x"))
    assert not is_transient(_client_error(403, "AccessDenied"))
    assert not is_transient(_client_error(404, "NoSuchBucket"))
    assert not is_transient(SSLError(endpoint_url="x", error="bad certificate"))


def test_cli_provenance_show(tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(png)
    runner = CliRunner()
    unmarked = runner.invoke(app, ["provenance", "show", str(png)])
    assert unmarked.exit_code == 1
    assert "marked as AI-generated (IPTC digital source type): NO" in unmarked.output

    marked = tmp_path / "marked.png"
    info = ProvenanceInfo(request_id="req-9", model_identity="m@1", creator_tool="zimage-pipeline")
    marked.write_bytes(mark_image(png.read_bytes(), "png", info))
    shown = runner.invoke(app, ["provenance", "show", str(marked)])
    assert shown.exit_code == 0, shown.output
    assert "zimage:RequestId: req-9" in shown.output
    assert "C2PA: no manifest" in shown.output
    as_json = runner.invoke(app, ["provenance", "show", "--json", str(marked)])
    assert '"marked_as_ai": true' in as_json.output
