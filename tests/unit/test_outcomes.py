"""The one table from an error to a request's ending and its delivery's fate."""

from __future__ import annotations

import pytest

from zimage_pipeline.admission import RequestExpiredError
from zimage_pipeline.errors import (
    AttemptsExhaustedError,
    DependencyUnavailable,
    Disposition,
    GenerationTimeoutError,
    InvalidRequestError,
    PluginFailedError,
    RequestRejectedError,
    ZImageError,
)
from zimage_pipeline.messages import Status
from zimage_pipeline.outcomes import TABLE, Handling, dead_letters, ending_status, handling


def test_every_disposition_has_a_row() -> None:
    assert set(TABLE) == set(Disposition)


@pytest.mark.parametrize(
    ("error", "running", "status"),
    [
        (InvalidRequestError("width: too wide"), False, Status.REJECTED),
        # the ledger has no running -> rejected: a refusal found while running fails
        (InvalidRequestError("width: too wide"), True, Status.FAILED),
        (PluginFailedError("p", "postprocessor", "boom"), False, Status.FAILED),
        (RequestExpiredError("expired"), False, Status.EXPIRED),
        (RequestExpiredError("expired"), True, Status.EXPIRED),
        (RequestRejectedError("gone", reason="CANCELLED"), False, Status.CANCELLED),
        (DependencyUnavailable("ldap down"), True, Status.FAILED),
    ],
)
def test_ending_status(error: ZImageError, running: bool, status: Status) -> None:
    assert ending_status(error, running=running) is status


def test_handling_by_disposition() -> None:
    assert handling(InvalidRequestError("x")) is Handling.ANSWER
    assert handling(PluginFailedError("p", "s", "c")) is Handling.ANSWER
    assert handling(DependencyUnavailable("db")) is Handling.RETRY_LATER
    assert handling(GenerationTimeoutError("gpu")) is Handling.EXIT


def test_dead_letters_only_junk_and_poison() -> None:
    assert dead_letters(InvalidRequestError("x"), ledger_request=False)
    assert dead_letters(AttemptsExhaustedError("crashes"))
    assert not dead_letters(InvalidRequestError("x"))
    assert not dead_letters(RequestRejectedError("no", reason="NOT_AUTHORIZED"))
