"""ObjectStore.get_object's answers that the real store cannot be made to give on demand:
AWS's 400 InvalidArgument for a version id it never issued (not found, not a failure),
and a body shorter than its Content-Length (a transient failure, retried; never bytes
whose checksum the client would be blamed for)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.response import StreamingBody
from urllib3.exceptions import ProtocolError

from zimage_pipeline.errors import DependencyUnavailable, InvalidRequestError
from zimage_pipeline.inputs.decode import InputLimits
from zimage_pipeline.inputs.fetch import read_input
from zimage_pipeline.inputs.model import parse_grant
from zimage_pipeline.messages import ImageRef
from zimage_pipeline.settings import StorageSettings
from zimage_pipeline.storage import ObjectStore, StorageFailedError
from zimage_pipeline.storage.errors import ObjectNotFoundError

DATA = bytes(range(256)) * 4
Answer = Callable[[], dict[str, Any]]


class ScriptedS3:
    """An S3 client whose get_object answers from a script, one entry per call."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        return answer()


def store_of(client: ScriptedS3) -> ObjectStore:
    settings = StorageSettings(max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)
    return ObjectStore(settings, client=client, sleep=lambda _: None)  # type: ignore[arg-type]


def refused(code: str, message: str, status: int, **fields: str) -> Answer:
    def answer() -> dict[str, Any]:
        error = {"Code": code, "Message": message, **fields}
        raise ClientError(
            {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}},  # type: ignore[typeddict-item]
            "GetObject",
        )

    return answer


def sent(data: bytes, *, announced: int | None = None) -> Answer:
    """A body of `data` whose response announces `announced` bytes (default: its size)."""

    def answer() -> dict[str, Any]:
        length = len(data) if announced is None else announced
        return {"Body": StreamingBody(io.BytesIO(data), length), "ContentLength": length}

    return answer


class _Dropping(io.BytesIO):
    """A connection that dies after half the body (urllib3 raises, botocore wraps)."""

    def read(self, amount: int | None = -1) -> bytes:
        raise ProtocolError("Connection broken: IncompleteRead(512 bytes read, 512 more)")


def dropped() -> dict[str, Any]:
    return {"Body": StreamingBody(_Dropping(), len(DATA)), "ContentLength": len(DATA)}


INVALID_VERSION = refused("InvalidArgument", "Invalid version id specified", 400)


@pytest.mark.parametrize(
    "answer",
    [
        INVALID_VERSION,
        refused("InvalidArgument", "Invalid Argument", 400, ArgumentName="versionId"),
        refused("NoSuchVersion", "The specified version does not exist.", 404),
    ],
)
def test_a_version_id_the_store_does_not_know_is_not_found(answer: Answer) -> None:
    client = ScriptedS3(answer)
    with pytest.raises(ObjectNotFoundError, match=r"\(version 3HL4kqtJ\) not found"):
        store_of(client).get_object("cms/a.png", bucket="in", version_id="3HL4kqtJ")
    assert len(client.calls) == 1 and client.calls[0]["VersionId"] == "3HL4kqtJ"  # no retry


def test_invalid_argument_without_a_version_stays_a_failure() -> None:
    with pytest.raises(StorageFailedError, match="InvalidArgument"):
        store_of(ScriptedS3(INVALID_VERSION)).get_object("cms/a.png", bucket="in")
    other = refused("InvalidArgument", "Invalid Argument", 400, ArgumentName="x-amz-sse")
    with pytest.raises(StorageFailedError, match="InvalidArgument"):
        store_of(ScriptedS3(other)).get_object("cms/a.png", bucket="in", version_id="v1")


@pytest.mark.parametrize("max_bytes", [None, 4096])
@pytest.mark.parametrize(
    "first", [sent(DATA[:100], announced=len(DATA)), dropped], ids=["short", "dropped"]
)
def test_a_short_read_is_retried(first: Answer, max_bytes: int | None) -> None:
    client = ScriptedS3(first, sent(DATA))
    assert store_of(client).get_object("cms/a.png", bucket="in", max_bytes=max_bytes) == DATA
    assert len(client.calls) == 2


def test_a_short_read_that_persists_fails_the_store() -> None:
    client = ScriptedS3(sent(DATA[:100], announced=len(DATA)))
    with pytest.raises(StorageFailedError, match="after 3 attempts"):
        store_of(client).get_object("cms/a.png", bucket="in", max_bytes=4096)


GRANTS = [parse_grant("zimage-inputs/cms/")]


def ref(**fields: Any) -> ImageRef:
    values = {
        "bucket": "zimage-inputs",
        "key": "cms/a.png",
        "sha256": hashlib.sha256(DATA).hexdigest(),
    }
    return ImageRef(**{**values, **fields})


def test_an_input_cut_short_is_the_stores_failure_not_a_checksum_mismatch() -> None:
    store = store_of(ScriptedS3(sent(DATA[:100], announced=len(DATA))))
    with pytest.raises(DependencyUnavailable, match="init_image: the input store cannot be read"):
        read_input(store, ref(), grants=GRANTS, limits=InputLimits(), what="init_image")


def test_an_input_with_an_unknown_version_is_invalid_naming_the_field() -> None:
    store = store_of(ScriptedS3(INVALID_VERSION))
    with pytest.raises(
        InvalidRequestError,
        match=r"^init_image: s3://zimage-inputs/cms/a.png \(version nope\) not found",
    ):
        read_input(
            store, ref(version_id="nope"), grants=GRANTS, limits=InputLimits(), what="init_image"
        )
