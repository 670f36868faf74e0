"""Group membership resolution, written against a search callable (no ldap3 here).

Each mode finds the account's groups; nested groups are then resolved breadth-first,
one search per nesting level, with a visited set so cycles in the directory end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from zimage_pipeline.directory import filters
from zimage_pipeline.directory.filters import MembershipMode
from zimage_pipeline.directory.identity import DirectoryUnavailableError


class Scope(Enum):
    BASE = "base"
    SUBTREE = "subtree"


@dataclass(frozen=True, slots=True)
class Entry:
    dn: str
    attributes: Mapping[str, Sequence[str]]


# search(base_dn, filter, scope, attributes) -> entries
Search = Callable[[str, str, Scope, Sequence[str]], list[Entry]]

MAX_NESTING_DEPTH = 16  # deeper than any sane directory; bounds the walk on a loop
MAX_GROUPS = 2_000  # a runaway membership graph must not exhaust the worker
FILTER_BATCH = 40  # DNs per `(|(member=...)...)` filter, under servers' filter limits


@dataclass(frozen=True, slots=True)
class GroupQuery:
    group_base_dn: str
    modes: tuple[MembershipMode, ...]


def resolve_groups(
    search: Search,
    query: GroupQuery,
    *,
    user_dn: str,
    username: str,
    member_of: Iterable[str],
) -> frozenset[str]:
    """Every group the account belongs to, directly or through nested groups."""
    found: dict[str, str] = {}  # normalized DN -> DN as the server spells it
    direct: list[str] = []
    if MembershipMode.MEMBER_UID in query.modes:
        # posixGroups hold usernames; they may in turn be members of groupOfNames groups.
        posix = search(query.group_base_dn, filters.member_uid_filter(username), Scope.SUBTREE, [])
        direct.extend(e.dn for e in posix)
    if MembershipMode.MEMBER_OF in query.modes:
        direct.extend(member_of)
        _add(found, direct)
        _walk_member_of(search, found, list(direct))
    if MembershipMode.MEMBER in query.modes:
        _add(found, direct)
        _walk_member(search, query.group_base_dn, found, [user_dn, *direct])
    if MembershipMode.AD_CHAIN in query.modes:
        chain = search(query.group_base_dn, filters.ad_chain_filter(user_dn), Scope.SUBTREE, [])
        _add(found, [e.dn for e in chain])
    _add(found, direct)
    return frozenset(found.values())


def _add(found: dict[str, str], dns: Iterable[str]) -> list[str]:
    new = []
    for dn in dns:
        key = filters.normalize_dn(dn)
        if key not in found:
            found[key] = dn
            new.append(dn)
    if len(found) > MAX_GROUPS:
        # Fail closed: a truncated list could silently drop a team budget to charge.
        raise DirectoryUnavailableError(
            f"more than {MAX_GROUPS} groups: refusing a runaway membership graph"
        )
    return new


def _walk_member(search: Search, base: str, found: dict[str, str], frontier: list[str]) -> None:
    """groupOfNames: level by level, the groups listing any DN of the frontier."""
    for _ in range(MAX_NESTING_DEPTH):
        if not frontier:
            return
        level: list[str] = []
        for start in range(0, len(frontier), FILTER_BATCH):
            batch = frontier[start : start + FILTER_BATCH]
            entries = search(base, filters.any_member_filter(batch), Scope.SUBTREE, [])
            level.extend(_add(found, [e.dn for e in entries]))
        frontier = level


def _walk_member_of(search: Search, found: dict[str, str], frontier: list[str]) -> None:
    """memberOf: each group's own memberOf names the groups it is nested in."""
    for _ in range(MAX_NESTING_DEPTH):
        if not frontier:
            return
        level: list[str] = []
        for group_dn in frontier:
            entries = search(group_dn, "(objectClass=*)", Scope.BASE, ["memberOf"])
            for entry in entries:
                level.extend(_add(found, entry.attributes.get("memberOf", [])))
        frontier = level
