"""The ldap3 adapter against the real local slapd (seeded from config/ldap/seed.ldif)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import require_env, require_port
from zimage_pipeline.directory import (
    DisabledUserError,
    Identity,
    LdapDirectory,
    UnknownUserError,
)
from zimage_pipeline.errors import RequestRejectedError
from zimage_pipeline.policy import resolve_policy
from zimage_pipeline.settings import DirectorySettings, load_settings
from zimage_pipeline.wiring.identity import DirectoryAuthorizer

pytestmark = pytest.mark.integration

GROUPS = "ou=groups,dc=example,dc=org"
NEWSROOM = f"cn=Rédaction Zürich (Nachrichten),{GROUPS}"
EDITORS = f"cn=editors,{GROUPS}"
GENERATORS = f"cn=zimage-generators,{GROUPS}"
DESIGN = f"cn=design-team,{GROUPS}"
PARIS = f"cn=Design *Paris* team,{GROUPS}"
FARM = f"cn=render-farm,{GROUPS}"
STAFF = f"cn=staff,{GROUPS}"


def directory_settings(**changes: object) -> DirectorySettings:
    require_env("ZIMAGE_DIRECTORY__BIND_PASSWORD_FILE")
    require_port("slapd", 3389)
    return load_settings().directory.model_copy(update=changes)


@pytest.fixture(params=["member", "memberOf"])
def directory(request: pytest.FixtureRequest) -> LdapDirectory:
    directory = LdapDirectory(directory_settings(membership=request.param))
    request.addfinalizer(directory.close)
    return directory


def test_nested_groups_resolve(directory: LdapDirectory) -> None:
    """zimage-generators ⊃ editors ⊃ Rédaction Zürich (Nachrichten) ⊃ jurgen."""
    jurgen = directory.lookup("jurgen")
    assert jurgen.dn == "uid=jurgen,ou=people,dc=example,dc=org"
    assert not jurgen.disabled
    assert jurgen.groups == {NEWSROOM, EDITORS, GENERATORS, STAFF}


@pytest.mark.parametrize(
    ("username", "groups"),
    [
        ("paren(thesis)", {DESIGN, GENERATORS}),
        ("star*name", {PARIS, DESIGN, GENERATORS}),
        ("back\\slash", {PARIS, DESIGN, GENERATORS}),
    ],
)
def test_names_that_need_escaping_are_found_exactly(
    directory: LdapDirectory, username: str, groups: set[str]
) -> None:
    found = directory.lookup(username)
    assert found.username == username
    assert found.groups == groups


@pytest.mark.parametrize(
    "username", ["*)(uid=*", "*", "alice)(|(uid=*", "star*", "*name", "back\\5cslash", "a\x00"]
)
def test_injection_attempts_find_nobody(directory: LdapDirectory, username: str) -> None:
    with pytest.raises(UnknownUserError) as denied:
        directory.lookup(username)
    assert denied.value.reason == "UNKNOWN_USER"


def test_disabled_and_unknown_accounts_are_denied(directory: LdapDirectory) -> None:
    with pytest.raises(DisabledUserError) as disabled:
        directory.lookup("dave")
    assert disabled.value.reason == "ACCOUNT_DISABLED"
    with pytest.raises(UnknownUserError):
        directory.lookup("nobody")


def test_the_directory_spelling_of_a_name_is_canonical(directory: LdapDirectory) -> None:
    assert directory.lookup("ALICE").username == "alice"


def test_posix_groups_join_the_nested_groups() -> None:
    with LdapDirectory(directory_settings(membership="memberUid,member")) as directory:
        alice = directory.lookup("alice")
    assert alice.groups == {EDITORS, GENERATORS, STAFF, FARM}


def test_alookup_answers_from_a_thread(directory: LdapDirectory) -> None:
    async def both() -> list[Identity]:
        return list(await asyncio.gather(directory.alookup("alice"), directory.alookup("bob")))

    alice, bob = asyncio.run(both())
    assert (alice.username, bob.username) == ("alice", "bob")
    assert DESIGN in bob.groups


def test_shipped_policy_on_the_seed_directory(directory: LdapDirectory) -> None:
    policy = load_settings().policy
    jurgen = resolve_policy(directory.lookup("jurgen"), policy)
    assert jurgen.roles == ("editor", "generator") and jurgen.generate
    publisher = resolve_policy(directory.lookup("cms-publisher"), policy)
    assert publisher.delegate
    carol = resolve_policy(directory.lookup("carol"), policy)
    assert not carol.generate
    bob = resolve_policy(directory.lookup("bob"), policy)
    assert [t.group for t in bob.teams] == [DESIGN]


def test_a_user_asking_for_herself_in_another_case_is_not_delegating(
    directory: LdapDirectory,
) -> None:
    """Directory ids compare without case: `alice` for `ALICE` is alice for herself (one
    quota, the directory's spelling), not a delegation she has no role for; bob for
    alice still is one."""
    authorizer = DirectoryAuthorizer(directory, load_settings().policy)
    auth = authorizer.authorize(principal="alice", on_behalf_of="ALICE")
    assert (auth.subject, auth.principal) == ("alice", "alice")
    with pytest.raises(RequestRejectedError) as refused:
        authorizer.authorize(principal="bob", on_behalf_of="ALICE")
    assert refused.value.reason == "DELEGATION_NOT_ALLOWED"
