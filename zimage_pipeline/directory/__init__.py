"""The directory: who an account is and which groups it is in (ldap3 adapter)."""

from __future__ import annotations

from zimage_pipeline.directory.identity import (
    DirectoryUnavailableError,
    DisabledUserError,
    Identity,
    UnknownUserError,
)
from zimage_pipeline.directory.ldap import LdapDirectory

__all__ = [
    "DirectoryUnavailableError",
    "DisabledUserError",
    "Identity",
    "LdapDirectory",
    "UnknownUserError",
]
