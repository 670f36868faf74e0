"""Every value that reaches an LDAP filter is escaped; DNs compare whatever their spelling."""

from __future__ import annotations

import pytest

from zimage_pipeline.directory import filters
from zimage_pipeline.directory.filters import MembershipMode
from zimage_pipeline.errors import ConfigError

TEMPLATE = "(&(objectClass=inetOrgPerson)(uid={username}))"


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("*)(uid=*", r"(&(objectClass=inetOrgPerson)(uid=\2a\29\28uid=\2a))"),
        ("*", r"(&(objectClass=inetOrgPerson)(uid=\2a))"),
        ("paren(thesis)", r"(&(objectClass=inetOrgPerson)(uid=paren\28thesis\29))"),
        ("star*name", r"(&(objectClass=inetOrgPerson)(uid=star\2aname))"),
        ("back\\slash", r"(&(objectClass=inetOrgPerson)(uid=back\5cslash))"),
        ("nul\x00byte", r"(&(objectClass=inetOrgPerson)(uid=nul\00byte))"),
        ("jürgen", "(&(objectClass=inetOrgPerson)(uid=jürgen))"),
    ],
)
def test_user_filter_escapes_the_username(username: str, expected: str) -> None:
    assert filters.user_filter(TEMPLATE, username) == expected


def test_user_filter_needs_the_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"\{username\}"):
        filters.user_filter("(uid=alice)", "bob")


def test_ad_chain_filter_uses_the_in_chain_rule_and_escapes_the_dn() -> None:
    dn = "CN=Star *,OU=People,DC=corp,DC=example"
    assert filters.ad_chain_filter(dn) == (
        r"(member:1.2.840.113556.1.4.1941:=CN=Star \2a,OU=People,DC=corp,DC=example)"
    )


def test_member_filters_escape_every_dn() -> None:
    flt = filters.any_member_filter(["uid=back\\5Cslash,dc=x", "cn=a (b),dc=x"])
    assert flt == r"(|(member=uid=back\5c5Cslash,dc=x)(member=cn=a \28b\29,dc=x))"
    assert filters.member_uid_filter("a*") == r"(&(objectClass=posixGroup)(memberUid=a\2a))"


def test_rdn_escapes_dn_specials() -> None:
    assert filters.rdn("uid", "a,b+c=d") == r"uid=a\,b\+c\=d"


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (
            "uid=back\\5Cslash,ou=people,dc=example,dc=org",
            "UID=back\\\\slash, ou=People,dc=example,dc=org",
        ),
        (
            "cn=R\\C3\\A9daction Z\\C3\\BCrich \\28Nachrichten\\29,ou=groups,dc=example,dc=org",
            "cn=Rédaction Zürich (Nachrichten),ou=groups,dc=example,dc=org",
        ),
        (
            "cn=Design *Paris* team,ou=groups,dc=example,dc=org",
            "CN=design *paris* TEAM,OU=groups,DC=example,DC=org",
        ),
    ],
)
def test_normalize_dn_unifies_spellings(left: str, right: str) -> None:
    assert filters.normalize_dn(left) == filters.normalize_dn(right)


def test_normalize_dn_keeps_different_groups_apart() -> None:
    assert filters.normalize_dn("cn=editors,dc=x") != filters.normalize_dn("cn=editors2,dc=x")
    assert filters.normalize_dn("cn=a\\,b,dc=x") != filters.normalize_dn("cn=a,cn=b,dc=x")


def test_parse_membership_accepts_lists_and_refuses_unknown_modes() -> None:
    assert filters.parse_membership("member") == (MembershipMode.MEMBER,)
    assert filters.parse_membership("memberuid, member") == (
        MembershipMode.MEMBER_UID,
        MembershipMode.MEMBER,
    )
    with pytest.raises(ConfigError, match="unknown mode"):
        filters.parse_membership("uniqueMember")


def test_username_attribute_and_usable_names() -> None:
    assert filters.username_attribute(TEMPLATE) == "uid"
    assert filters.username_attribute("(sAMAccountName={username})") == "sAMAccountName"
    assert filters.username_attribute("(|(uid={username})(mail={username}))") == "uid"
    assert filters.usable_username("alice")
    assert not filters.usable_username("")
    assert not filters.usable_username("x" * 257)
    assert not filters.usable_username("line\nbreak")
