"""A stopped directory fails closed (RETRY, nothing authorized) and recovers when it is
back, against a private slapd this test may stop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.private_slapd import PrivateSlapd
from zimage_pipeline.directory import DirectoryUnavailableError, LdapDirectory
from zimage_pipeline.errors import Disposition
from zimage_pipeline.settings import DirectorySettings

pytestmark = pytest.mark.integration


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[PrivateSlapd]:
    server = PrivateSlapd(tmp_path / "ldap")
    server.start()
    try:
        server.seed()
        yield server
    finally:
        server.stop()


def settings_for(server: PrivateSlapd, **changes: object) -> DirectorySettings:
    return DirectorySettings(
        url=server.url,
        ca_cert_file=server.ca_cert,
        bind_password_file=server.bind_password_file,
        connect_timeout_s=2,
        search_timeout_s=2,
        **changes,  # type: ignore[arg-type]
    )


def test_stopped_directory_fails_closed_and_recovers(slapd: PrivateSlapd) -> None:
    # Given a directory client with no cache, so that every lookup asks the server
    directory = LdapDirectory(settings_for(slapd, cache_ttl_s=0, negative_cache_ttl_s=0))
    try:
        assert directory.lookup("jurgen").username == "jurgen"

        # When slapd stops
        slapd.stop()

        # Then known and unknown names alike get a RETRY error, never an answer
        for name in ("jurgen", "nobody"):
            with pytest.raises(DirectoryUnavailableError) as down:
                directory.lookup(name)
            assert down.value.disposition is Disposition.RETRY
            assert down.value.reason == "DIRECTORY_UNAVAILABLE"
            assert slapd.url in str(down.value)
            assert slapd.bind_password_file.read_text(encoding="utf-8") not in str(down.value)
        with pytest.raises(DirectoryUnavailableError):
            asyncio.run(directory.alookup("alice"))

        # When it comes back, the same client answers again (stale connections replaced)
        slapd.start()
        assert directory.lookup("jurgen").groups
        assert asyncio.run(directory.alookup("alice")).username == "alice"
    finally:
        directory.close()


def test_a_warm_cache_answers_within_its_ttl_but_cold_names_fail_closed(
    slapd: PrivateSlapd,
) -> None:
    directory = LdapDirectory(settings_for(slapd, cache_ttl_s=60))
    try:
        alice = directory.lookup("alice")
        slapd.stop()
        assert directory.lookup("alice") == alice
        with pytest.raises(DirectoryUnavailableError):
            directory.lookup("bob")
    finally:
        directory.close()


def test_wrong_service_password_fails_closed(slapd: PrivateSlapd, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password", encoding="utf-8")
    directory = LdapDirectory(settings_for(slapd).model_copy(update={"bind_password_file": wrong}))
    try:
        with pytest.raises(DirectoryUnavailableError) as down:
            directory.lookup("alice")
        assert "not-the-password" not in str(down.value)
    finally:
        directory.close()
