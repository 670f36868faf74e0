"""LdapDirectory's cache and fail-closed contract, with the network part replaced."""

from __future__ import annotations

import asyncio
import logging

import pytest

from zimage_pipeline.directory import (
    DirectoryUnavailableError,
    DisabledUserError,
    Identity,
    LdapDirectory,
    UnknownUserError,
)
from zimage_pipeline.errors import Disposition
from zimage_pipeline.settings import DirectorySettings

ALICE = Identity("alice", "uid=alice,dc=x", frozenset({"cn=editors,dc=x"}), disabled=False)
DAVE = Identity("dave", "uid=dave,dc=x", frozenset(), disabled=True)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class Answers:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down = False

    def __call__(self, username: str) -> Identity | None:
        self.calls.append(username)
        if self.down:
            raise DirectoryUnavailableError("directory ldap://x unavailable: refused")
        return {"alice": ALICE, "dave": DAVE}.get(username)


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> tuple[LdapDirectory, Answers, Clock]:
    clock = Clock()
    directory = LdapDirectory(
        DirectorySettings(cache_ttl_s=60, negative_cache_ttl_s=15), clock=clock
    )
    answers = Answers()
    monkeypatch.setattr(directory, "_fetch", answers)
    return directory, answers, clock


def test_positive_and_negative_answers_are_cached_for_their_ttl(
    setup: tuple[LdapDirectory, Answers, Clock],
) -> None:
    directory, answers, clock = setup
    assert directory.lookup("alice") == ALICE
    assert directory.lookup("alice") == ALICE
    with pytest.raises(UnknownUserError) as unknown:
        directory.lookup("ghost")
    assert unknown.value.disposition is Disposition.REJECT
    assert unknown.value.reason == "UNKNOWN_USER"
    with pytest.raises(UnknownUserError):
        directory.lookup("ghost")
    assert answers.calls == ["alice", "ghost"]
    clock.now = 16  # negative entry gone, positive still there
    with pytest.raises(UnknownUserError):
        directory.lookup("ghost")
    directory.lookup("alice")
    assert answers.calls == ["alice", "ghost", "ghost"]


def test_disabled_account_is_denied_with_its_reason(
    setup: tuple[LdapDirectory, Answers, Clock],
) -> None:
    directory, _answers, _clock = setup
    with pytest.raises(DisabledUserError) as denied:
        directory.lookup("dave")
    assert (denied.value.disposition, denied.value.reason) == (
        Disposition.REJECT,
        "ACCOUNT_DISABLED",
    )


def test_an_outage_is_never_cached_and_fails_closed(
    setup: tuple[LdapDirectory, Answers, Clock],
) -> None:
    directory, answers, _clock = setup
    answers.down = True
    for _ in range(2):
        with pytest.raises(DirectoryUnavailableError) as down:
            directory.lookup("alice")
        assert (down.value.disposition, down.value.reason) == (
            Disposition.RETRY,
            "DIRECTORY_UNAVAILABLE",
        )
    answers.down = False
    assert directory.lookup("alice") == ALICE
    assert answers.calls == ["alice", "alice", "alice"]


def test_unusable_names_never_reach_the_directory(
    setup: tuple[LdapDirectory, Answers, Clock],
) -> None:
    directory, answers, _clock = setup
    with pytest.raises(UnknownUserError):
        directory.lookup("")
    assert answers.calls == []


def test_alookup_runs_off_the_event_loop(setup: tuple[LdapDirectory, Answers, Clock]) -> None:
    directory, _answers, _clock = setup

    async def main() -> Identity:
        return await directory.alookup("alice")

    assert asyncio.run(main()) == ALICE
    directory.close()


def test_turning_tls_verification_off_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="zimage_pipeline.directory.ldap"):
        LdapDirectory(DirectorySettings(verify_tls=False)).close()
    assert "verification is OFF" in caplog.text
