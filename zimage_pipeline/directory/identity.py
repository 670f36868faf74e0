"""What the directory says about one account, and the errors a lookup can end in."""

from __future__ import annotations

from dataclasses import dataclass

from zimage_pipeline.errors import DependencyUnavailable, Disposition, ZImageError


@dataclass(frozen=True, slots=True)
class Identity:
    """One account as the worker sees it.

    `username` is the directory's spelling (the value of the attribute the user filter
    matches on), so that `Alice` and `alice` are charged to the same quota. `groups` holds
    the DNs of every group the account belongs to, nested memberships resolved.
    """

    username: str
    dn: str
    groups: frozenset[str]
    disabled: bool


class UnknownUserError(ZImageError):
    """No account (or more than one) matches the name: the request is denied."""

    disposition = Disposition.REJECT
    reason = "UNKNOWN_USER"


class DisabledUserError(ZImageError):
    """The account exists but matches the configured `disabled_filter`: denied."""

    disposition = Disposition.REJECT
    reason = "ACCOUNT_DISABLED"


class DirectoryUnavailableError(DependencyUnavailable):
    """The directory cannot answer: fail closed (nothing runs unauthorized), retry later."""

    disposition = Disposition.RETRY
    reason = "DIRECTORY_UNAVAILABLE"
