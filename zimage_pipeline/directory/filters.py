"""LDAP filter construction and DN handling: every value that reaches a filter is escaped.

Pure functions (no connection), so that the filters sent to the server, including the
Active Directory one that the OpenLDAP test directory cannot run, are unit-tested.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from zimage_pipeline.errors import ConfigError

# LDAP_MATCHING_RULE_IN_CHAIN: Active Directory walks nested groups server-side.
MATCHING_RULE_IN_CHAIN = "1.2.840.113556.1.4.1941"
USERNAME_PLACEHOLDER = "{username}"
MAX_USERNAME_LENGTH = 256


class MembershipMode(StrEnum):
    MEMBER = "member"  # groupOfNames/groupOfUniqueNames `member`: nested walked client-side
    MEMBER_OF = "memberOf"  # the account's `memberOf` (OpenLDAP overlay, AD), groups' in turn
    MEMBER_UID = "memberUid"  # posixGroup `memberUid` holds usernames, not DNs
    AD_CHAIN = "ad_chain"  # AD: one search with the in-chain matching rule


def parse_membership(value: str) -> tuple[MembershipMode, ...]:
    """`membership` setting: one mode or a comma-separated list (their groups are united)."""
    by_name = {mode.value.lower(): mode for mode in MembershipMode}
    modes: list[MembershipMode] = []
    for part in value.split(","):
        name = part.strip().lower()
        if name not in by_name:
            known = ", ".join(m.value for m in MembershipMode)
            raise ConfigError(f"directory.membership: unknown mode {part.strip()!r} ({known})")
        if by_name[name] not in modes:
            modes.append(by_name[name])
    return tuple(modes)


def escape(value: str) -> str:
    """RFC 4515 escaping of an assertion value: `*`, `(`, `)`, `\\` and NUL lose meaning."""
    return str(escape_filter_chars(value))


def user_filter(template: str, username: str) -> str:
    """The configured user filter with the escaped username in place of `{username}`.

    str.replace, not str.format: a template may legitimately contain braces elsewhere.
    """
    if USERNAME_PLACEHOLDER not in template:
        raise ConfigError("directory.user_filter must contain {username}")
    return template.replace(USERNAME_PLACEHOLDER, escape(username))


def username_attribute(template: str) -> str | None:
    """The attribute the user filter matches the name on (`uid`, `sAMAccountName`)."""
    match = re.search(r"\(([A-Za-z][\w-]*)=" + re.escape(USERNAME_PLACEHOLDER) + r"\)", template)
    return match.group(1) if match else None


def usable_username(username: str) -> bool:
    """Names no directory could hold are refused before any search is sent."""
    return 0 < len(username) <= MAX_USERNAME_LENGTH and username.isprintable()


def any_member_filter(dns: Iterable[str], attribute: str = "member") -> str:
    """Groups listing any of `dns` as a member: `(|(member=dn1)(member=dn2)...)`."""
    terms = "".join(f"({attribute}={escape(dn)})" for dn in dns)
    return f"(|{terms})"


def member_uid_filter(username: str) -> str:
    return f"(&(objectClass=posixGroup)(memberUid={escape(username)}))"


def ad_chain_filter(user_dn: str) -> str:
    """Every group the account is in, transitively (Active Directory only)."""
    return f"(member:{MATCHING_RULE_IN_CHAIN}:={escape(user_dn)})"


def and_filter(*filters: str) -> str:
    return "(&" + "".join(filters) + ")"


def rdn(attribute: str, value: str) -> str:
    """An RDN built from a value, escaped per RFC 4514 (for DNs composed from input)."""
    return f"{attribute}={escape_rdn(value)}"


_HEX_PAIR = re.compile(r"\\([0-9A-Fa-f]{2})")


def _unescape_dn_value(value: str) -> str:
    """RFC 4514 value to its text: `\\5C` and `\\\\` both mean one backslash."""
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            pair = _HEX_PAIR.match(value, i)
            if pair:
                out.append(int(pair.group(1), 16))
                i += 3
                continue
            out.extend(value[i + 1].encode("utf-8"))
            i += 2
            continue
        out.extend(char.encode("utf-8"))
        i += 1
    return out.decode("utf-8", errors="replace")


def normalize_dn(dn: str) -> str:
    """A comparison key for DNs: escapes unified, attribute names and values case-folded.

    The server and the policy file may spell one DN differently (`\\5C` vs `\\\\`, case,
    spaces after commas); group names in directories compare case-insensitively.
    """
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except Exception:  # ldap3 raises its own and built-in types for malformed DNs
        return dn.strip().casefold()
    pieces = []
    for attribute, value, separator in parts:
        text = _unescape_dn_value(value).strip().casefold()
        pieces.append(f"{attribute.strip().casefold()}={escape_rdn(text) if text else ''}")
        pieces.append(separator)
    return "".join(pieces)
