"""Group resolution against an in-memory directory: nesting, cycles and every mode."""

from __future__ import annotations

import re
from collections.abc import Sequence

from zimage_pipeline.directory import filters
from zimage_pipeline.directory.filters import MembershipMode
from zimage_pipeline.directory.membership import Entry, GroupQuery, Scope, resolve_groups

BASE = "ou=groups,dc=x"
USER = "uid=jurgen,ou=people,dc=x"
NEWSROOM = "cn=Rédaction Zürich (Nachrichten),ou=groups,dc=x"
EDITORS = "cn=editors,ou=groups,dc=x"
GENERATORS = "cn=zimage-generators,ou=groups,dc=x"
FARM = "cn=render-farm,ou=groups,dc=x"

# group -> its `member` values; a cycle generators <-> editors must not loop forever.
MEMBERS = {
    NEWSROOM: [USER],
    EDITORS: [NEWSROOM],
    GENERATORS: [EDITORS],
    FARM: [],
}
MEMBERS_WITH_CYCLE = {**MEMBERS, EDITORS: [NEWSROOM, GENERATORS]}


class FakeDirectory:
    def __init__(self, members: dict[str, list[str]], member_uids: dict[str, list[str]]) -> None:
        self.members = members
        self.member_uids = member_uids
        self.filters: list[str] = []

    def member_of(self, dn: str) -> list[str]:
        return [g for g, ms in self.members.items() if dn in ms]

    def search(self, base: str, flt: str, scope: Scope, attributes: Sequence[str]) -> list[Entry]:
        self.filters.append(flt)
        if scope is Scope.BASE:
            return [Entry(base, {"memberOf": self.member_of(base)})]
        if flt.startswith("(|(member="):
            wanted = {
                filters.normalize_dn(_unescape(v))
                for v in re.findall(r"\(member=(.*?)\)(?=\(|\)$)", flt)
            }
            return [
                Entry(g, {})
                for g, ms in self.members.items()
                if wanted & {filters.normalize_dn(m) for m in ms}
            ]
        if "memberUid=" in flt:
            uid = _unescape(flt.split("memberUid=")[1].rstrip(")"))
            return [Entry(g, {}) for g, uids in self.member_uids.items() if uid in uids]
        return []


def _unescape(value: str) -> str:
    return re.sub(r"\\([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _resolve(
    directory: FakeDirectory, *modes: MembershipMode, member_of: list[str] | None = None
) -> frozenset[str]:
    return resolve_groups(
        directory.search,
        GroupQuery(BASE, modes),
        user_dn=USER,
        username="jurgen",
        member_of=member_of or [],
    )


def test_member_mode_resolves_nested_groups_level_by_level() -> None:
    directory = FakeDirectory(MEMBERS, {})
    assert _resolve(directory, MembershipMode.MEMBER) == {NEWSROOM, EDITORS, GENERATORS}
    assert len(directory.filters) == 4  # three levels found, a fourth finds nothing


def test_cycles_end() -> None:
    directory = FakeDirectory(MEMBERS_WITH_CYCLE, {})
    assert _resolve(directory, MembershipMode.MEMBER) == {NEWSROOM, EDITORS, GENERATORS}


def test_member_of_mode_walks_the_groups_member_of() -> None:
    directory = FakeDirectory(MEMBERS, {})
    groups = _resolve(directory, MembershipMode.MEMBER_OF, member_of=[NEWSROOM])
    assert groups == {NEWSROOM, EDITORS, GENERATORS}


def test_posix_groups_by_username_feed_the_nested_walk() -> None:
    members = {**MEMBERS, GENERATORS: [EDITORS, FARM]}
    directory = FakeDirectory(members, {FARM: ["jurgen"]})
    assert _resolve(directory, MembershipMode.MEMBER_UID) == {FARM}
    both = _resolve(directory, MembershipMode.MEMBER_UID, MembershipMode.MEMBER)
    assert both == {FARM, NEWSROOM, EDITORS, GENERATORS}


def test_ad_chain_sends_one_in_chain_search() -> None:
    directory = FakeDirectory(MEMBERS, {})
    _resolve(directory, MembershipMode.AD_CHAIN)
    assert directory.filters == [f"(member:{filters.MATCHING_RULE_IN_CHAIN}:={USER})"]
