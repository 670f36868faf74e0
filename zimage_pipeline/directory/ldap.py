"""ldap3 adapter: service bind over verified TLS, escaped filters, timeouts, a bounded TTL
cache and fail-closed errors.

`lookup` is synchronous (the worker calls it from a thread); `alookup` runs it on this
directory's own small thread pool so that ldap3 never blocks the event loop. ldap3
connections are not shared between threads: each search borrows one from a pool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPNoSuchObjectResult

from zimage_pipeline.directory import filters
from zimage_pipeline.directory.cache import TtlCache
from zimage_pipeline.directory.identity import (
    DirectoryUnavailableError,
    DisabledUserError,
    Identity,
    UnknownUserError,
)
from zimage_pipeline.directory.membership import Entry, GroupQuery, Scope, resolve_groups
from zimage_pipeline.settings import DirectorySettings

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 4


class LdapDirectory:
    def __init__(
        self,
        settings: DirectorySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self._settings = settings
        filters.user_filter(settings.user_filter, "probe")  # ConfigError now, not per request
        self._query = GroupQuery(
            settings.group_base_dn, filters.parse_membership(settings.membership)
        )
        self._username_attribute = filters.username_attribute(settings.user_filter)
        self._cache: TtlCache[Identity | None] = TtlCache(
            max_entries=settings.cache_max_entries, clock=clock
        )
        self._idle: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue(maxsize=pool_size)
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="ldap")
        self._ldaps = settings.url.lower().startswith("ldaps://")
        self._tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED if settings.verify_tls else ssl.CERT_NONE,
            ca_certs_file=str(settings.ca_cert_file) if settings.ca_cert_file else None,
        )
        if not settings.verify_tls:
            log.warning(
                "directory: TLS certificate verification is OFF (directory.verify_tls = false); "
                "the bind password can be intercepted by anyone on the path to %s",
                settings.url,
            )
        if not self._ldaps and not settings.start_tls:
            log.warning("directory: %s is used without TLS; the bind is in clear", settings.url)

    # -- public API ---------------------------------------------------------------------

    def lookup(self, username: str) -> Identity:
        """The account and its groups; raises UnknownUserError, DisabledUserError or
        DirectoryUnavailableError (nothing is cached while the directory is down)."""
        hit, identity = self._cache.get(username)
        if not hit:
            identity = self._fetch(username) if filters.usable_username(username) else None
            ttl = self._settings.cache_ttl_s
            if identity is None:
                ttl = self._settings.negative_cache_ttl_s
            self._cache.put(username, identity, ttl_s=ttl)
        return _verdict(username, identity)

    async def alookup(self, username: str) -> Identity:
        hit, identity = self._cache.get(username)
        if hit:  # a warm cache answers without a thread hop
            return _verdict(username, identity)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.lookup, username)

    def invalidate(self, username: str | None = None) -> None:
        self._cache.invalidate(username)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._idle.get_nowait().unbind()
            except queue.Empty:
                return
            except LDAPException:
                continue

    def __enter__(self) -> LdapDirectory:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- connections ----------------------------------------------------------------------

    def _fetch(self, username: str) -> Identity | None:
        last: LDAPException | None = None
        for _ in range(2):
            reused = True
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                reused = False
                connection = None
            try:
                if connection is None:
                    connection = self._connect()
                identity = self._query_user(connection, username)
            except LDAPException as exc:
                _discard(connection)
                last = exc
                if reused:
                    continue  # a pooled connection may be stale (server restarted): retry once
                break
            except BaseException:
                _discard(connection)
                raise
            self._give_back(connection)
            return identity
        detail = self._redact(f"{type(last).__name__}: {last}")
        log.warning("directory: %s unavailable, failing closed: %s", self._settings.url, detail)
        raise DirectoryUnavailableError(
            f"directory {self._settings.url} unavailable: {detail}"
        ) from last

    def _connect(self) -> ldap3.Connection:
        settings = self._settings
        # A new Server per connection: ldap3 marks a Server's addresses unusable after a
        # failed connect and keeps them so for minutes, which would outlast the outage.
        server = ldap3.Server(
            settings.url,
            use_ssl=self._ldaps,
            tls=self._tls,
            connect_timeout=settings.connect_timeout_s,
            get_info=ldap3.NONE,  # no schema download: one round trip less per connection
        )
        connection = ldap3.Connection(
            server,
            user=settings.bind_dn,
            password=settings.resolved_bind_password().get_secret_value(),
            receive_timeout=math.ceil(settings.search_timeout_s),
            raise_exceptions=True,
            read_only=True,
            auto_referrals=False,
            client_strategy=ldap3.SYNC,
        )
        try:
            connection.open()
            if settings.start_tls and not self._ldaps:
                connection.start_tls()
            connection.bind()
        except BaseException:
            _discard(connection)
            raise
        return connection

    def _give_back(self, connection: ldap3.Connection) -> None:
        try:
            self._idle.put_nowait(connection)
        except queue.Full:
            _discard(connection)

    def _redact(self, text: str) -> str:
        try:
            secret = self._settings.resolved_bind_password().get_secret_value()
        except Exception:  # the file may be gone; the text then cannot contain it anyway
            return text
        return text.replace(secret, "***") if secret else text

    # -- queries --------------------------------------------------------------------------

    def _query_user(self, connection: ldap3.Connection, username: str) -> Identity | None:
        settings = self._settings
        search = _searcher(connection, time_limit_s=math.ceil(settings.search_timeout_s))
        attributes = [self._username_attribute] if self._username_attribute else []
        if filters.MembershipMode.MEMBER_OF in self._query.modes:
            attributes.append("memberOf")
        flt = filters.user_filter(settings.user_filter, username)
        entries = search(settings.user_base_dn, flt, Scope.SUBTREE, attributes)
        if len(entries) != 1:
            if entries:
                log.warning("directory: %d accounts match %r; denying", len(entries), username)
            return None
        entry = entries[0]
        canonical = _canonical_name(entry, self._username_attribute, username)
        disabled = bool(
            settings.disabled_filter and search(entry.dn, settings.disabled_filter, Scope.BASE, [])
        )
        groups: frozenset[str] = frozenset()
        if not disabled:  # a disabled account is denied whatever its groups
            groups = resolve_groups(
                search,
                self._query,
                user_dn=entry.dn,
                username=canonical,
                member_of=entry.attributes.get("memberOf", []),
            )
        return Identity(username=canonical, dn=entry.dn, groups=groups, disabled=disabled)


def _verdict(username: str, identity: Identity | None) -> Identity:
    if identity is None:
        raise UnknownUserError(f"no single directory account is named {username!r}")
    if identity.disabled:
        raise DisabledUserError(f"the directory account {identity.username!r} is disabled")
    return identity


def _canonical_name(entry: Entry, attribute: str | None, requested: str) -> str:
    values = entry.attributes.get(attribute, []) if attribute else []
    for value in values:
        if value.casefold() == requested.casefold():
            return value
    return values[0] if values else requested


def _discard(connection: ldap3.Connection | None) -> None:
    if connection is None:
        return
    try:
        connection.unbind()
    except Exception:  # best effort: the socket may already be dead
        log.debug("directory: unbind of a discarded connection failed", exc_info=True)


def _searcher(
    connection: ldap3.Connection, *, time_limit_s: int
) -> Callable[[str, str, Scope, Sequence[str]], list[Entry]]:
    def search(base: str, flt: str, scope: Scope, attributes: Sequence[str]) -> list[Entry]:
        try:
            connection.search(
                base,
                flt,
                search_scope=ldap3.BASE if scope is Scope.BASE else ldap3.SUBTREE,
                attributes=list(attributes) or [ldap3.NO_ATTRIBUTES],
                time_limit=time_limit_s,
            )
        except LDAPNoSuchObjectResult:
            return []  # a dangling group reference or a missing base: nothing there
        return [
            Entry(item["dn"], {k: _strings(v) for k, v in item.get("attributes", {}).items()})
            for item in connection.response or []
            if item.get("type") == "searchResEntry"
        ]

    return search


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]
