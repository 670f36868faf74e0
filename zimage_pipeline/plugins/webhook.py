"""The webhook result sink: POST each result, signed, to the configured URLs.

    [plugins.webhook]
    enabled = true
    # Each tenant's results go to that tenant's receivers only, signed with its secret:
    [plugins.webhook.publishers.cms-publisher]
    urls = ["https://cms.example/hooks/zimage"]
    secret_file = "/run/secrets/webhook-cms"   # or secret = "..."; absent: the shared one
    [plugins.webhook.publishers.pim-sync]
    urls = ["https://pim.example/zimage"]
    secret_file = "/run/secrets/webhook-pim"
    # Every publisher's results (one tenant, or a trusted internal router):
    # urls = ["https://router.internal/zimage"]
    # secret_file = "/run/secrets/webhook"  # the shared secret (ZIMAGE_PLUGINS__WEBHOOK__SECRET)
    timeout_s = 10          # per URL, connect and response together
    max_attempts = 8        # then the delivery is dead (`audit show` lists it)
    backoff_base_s = 2      # between attempts: random up to min(max, base * 2^(n-1))
    backoff_max_s = 300
    verify_tls = true
    # ca_bundle = "/etc/ssl/private-ca.pem"

Every attempt POSTs the result event as canonical JSON (sorted keys, no spaces, UTF-8)
with these headers:

    X-Zimage-Delivery:  the delivery id, the same on every attempt: drop repeats by it
    X-Zimage-Attempt:   1, 2, ...
    X-Zimage-Timestamp: Unix seconds when the attempt was signed
    X-Zimage-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A result goes to `urls` and to the URLs of its publisher's route (the AMQP account
that published the request). A publisher with no route, when `urls` is empty, gets no
webhook: nothing is queued for it. A route signs with its own secret, so one tenant's
receiver, holding only its secret, cannot forge deliveries to another's.

A receiver checks the signature and rejects a timestamp outside its replay window
(`verify_signature` does both). Any answer other than 2xx, or no answer, from any URL
fails the attempt; the outbox retries it (all URLs again: a receiver drops the repeat by
its delivery id). Redirects are not followed: a signed POST goes where it was configured.
The AMQP result stays the source of truth; the webhook is a convenience copy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Self

import urllib3
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from urllib3.util import parse_url

from zimage_pipeline.errors import ConfigError, ZImageError
from zimage_pipeline.ledger.outbox import RetryPolicy
from zimage_pipeline.plugins.api import SinkDelivery
from zimage_pipeline.settings import read_secret_file

SETTING = "plugins.webhook"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0
_ERROR_DETAIL = 160  # characters of a transport error kept in the message


class WebhookConfigError(ConfigError, ValueError):
    """The webhook's table is wrong; names the key (`plugins.webhook.<key>`)."""


class WebhookDeliveryError(ZImageError):
    """An attempt failed at one or more URLs; the message names each URL's host and what
    happened (status or transport error), never the secret, a path or a query."""


def _listed(value: Any) -> Any:
    """From an environment variable a list of URLs arrives as text: a JSON list, or
    URLs separated by commas."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def _http_urls(urls: list[str]) -> list[str]:
    for url in urls:
        parsed = parse_url(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        if parsed.auth:
            # urllib3 would not send them, and the URL would carry a secret into
            # the configuration listing; the signature authenticates the sender.
            raise ValueError(f"a URL must not carry credentials (host {parsed.host})")
    return urls


# A list of http(s) URLs; text (an environment variable) is split first.
Urls = Annotated[list[str], BeforeValidator(_listed), AfterValidator(_http_urls)]


class WebhookRoute(BaseModel):
    """`[plugins.webhook.publishers.<account>]`: one tenant's receivers and secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: Annotated[Urls, Field(min_length=1)]
    secret: SecretStr | None = None
    secret_file: Path | None = None


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Every publisher's results go here; each publisher's own route adds its URLs.
    urls: Urls = []
    publishers: dict[str, WebhookRoute] = {}
    secret: SecretStr | None = None
    secret_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_base_s: float = Field(default=2.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    verify_tls: bool = True
    ca_bundle: Path | None = None
    enabled: bool = True  # the registry's switch; accepted here, not used

    @model_validator(mode="after")
    def _somewhere_to_post(self) -> Self:
        if not self.urls and not self.publishers:
            raise ValueError(
                f"{SETTING}.urls: no URLs; set urls (every publisher's results) or "
                f"[{SETTING}.publishers.<account>] urls (one publisher's)"
            )
        return self

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
        )


def canonical_body(event: Mapping[str, Any]) -> bytes:
    """The bytes that are POSTed and signed: one spelling of the event for any receiver."""
    text = json.dumps(
        event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def sign(secret: bytes, *, timestamp: str, body: bytes) -> str:
    """The X-Zimage-Signature value for `body` signed at `timestamp`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify_signature(
    secret: bytes,
    *,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """For receivers: whether `signature` (the header; several `v1=` values separated by
    commas are accepted, for a secret being rotated) signs `body` at `timestamp`, and
    `timestamp` lies within `tolerance_s` of `now` (a captured request replayed later
    fails). The comparison takes constant time."""
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    expected = sign(secret, timestamp=timestamp, body=body).encode()
    offered = [part.strip().encode() for part in signature.split(",")]
    # Compare against every candidate (no early exit), so timing says nothing either.
    matches = [hmac.compare_digest(expected, candidate) for candidate in offered]
    return any(matches)


class WebhookSink:
    """The `webhook` result sink. `retry_policy` is read by the outbox dispatcher.

    `secret` signs for `urls` and for the routes without their own; `route_secrets`:
    the routes' own, by publisher. A URL left without a secret is a WebhookConfigError
    naming the shared secret, here, before anything is delivered."""

    def __init__(
        self,
        config: WebhookConfig,
        secret: SecretStr | None,
        *,
        route_secrets: Mapping[str, SecretStr] | None = None,
        clock: Callable[[], float] = time.time,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        own = route_secrets or {}
        self.urls = tuple(config.urls)
        # Each URL with the secret it is signed with, kept as SecretStr (no repr shows it).
        self._shared = _signed(config.urls, secret)
        self._routes = {
            publisher: _signed(route.urls, own.get(publisher, secret))
            for publisher, route in config.publishers.items()
        }
        self.retry_policy = config.retry_policy()
        self.timeout_s = config.timeout_s
        self._secret = secret
        self._clock = clock
        self._pool = pool or _pool(config)

    def targets(self, publisher: str | None) -> list[tuple[str, SecretStr]]:
        """Where a result of `publisher` goes, each URL with the secret it is signed
        with: every publisher's `urls`, then its own route's."""
        own = () if publisher is None else self._routes.get(publisher, ())
        return [*self._shared, *own]

    def wants(self, publisher: str | None) -> bool:
        """Whether this publisher's results go anywhere (the outbox queues them only then)."""
        return bool(self.targets(publisher))

    def deliver(self, delivery: SinkDelivery) -> None:
        body = canonical_body(delivery.event)
        failures = [
            problem
            for url, secret in self.targets(delivery.publisher)
            if (problem := self._post(url, body, self.headers(delivery, body, secret=secret)))
        ]
        if failures:
            raise WebhookDeliveryError(
                f"webhook attempt {delivery.attempt} failed: {'; '.join(failures)}"
            )

    def headers(
        self, delivery: SinkDelivery, body: bytes, *, secret: SecretStr | None = None
    ) -> dict[str, str]:
        """The attempt's headers, signed now (each attempt has a fresh timestamp) with
        `secret`, else the shared secret."""
        timestamp = str(int(self._clock()))
        signing = secret or self._secret
        if signing is None:
            raise _missing_secret()
        key = signing.get_secret_value().encode("utf-8")
        return {
            "Content-Type": "application/json",
            "X-Zimage-Delivery": delivery.delivery_id,
            "X-Zimage-Attempt": str(delivery.attempt),
            "X-Zimage-Timestamp": timestamp,
            "X-Zimage-Signature": sign(key, timestamp=timestamp, body=body),
        }

    def close(self) -> None:
        self._pool.clear()

    def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> str | None:
        """None when the URL answered 2xx, else what went wrong, naming its host only."""
        host = _host(url)
        try:
            response = self._pool.request(
                "POST",
                url,
                body=body,
                headers=headers,
                timeout=urllib3.Timeout(total=self.timeout_s),
                retries=False,  # the outbox retries, with backoff and a record
                redirect=False,
                preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            return f"{host}: {type(exc).__name__}: {_scrub(str(exc), url, host)}"
        try:
            if 200 <= response.status < 300:
                return None
            return f"{host}: HTTP {response.status}"
        finally:
            response.drain_conn()  # the body is not read; the connection goes back
            response.release_conn()


def create(config: Mapping[str, Any]) -> WebhookSink:
    """The entry point's factory: `[plugins.webhook]`, validated. The shared secret is
    required when `urls` is set or a route has no secret of its own (WebhookSink says)."""
    parsed = _validated(config)
    own = {
        publisher: secret
        for publisher, route in parsed.publishers.items()
        if (
            secret := _read_secret(
                route.secret, route.secret_file, setting=f"{SETTING}.publishers.{publisher}"
            )
        )
        is not None
    }
    shared = _read_secret(parsed.secret, parsed.secret_file, setting=SETTING)
    return WebhookSink(parsed, shared, route_secrets=own)


def _validated(config: Mapping[str, Any]) -> WebhookConfig:
    try:
        return WebhookConfig.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join((SETTING, *(str(p) for p in err['loc'])))}: {err['msg']}"
            for err in exc.errors(include_input=False)
        )
        raise WebhookConfigError(problems) from None
    except json.JSONDecodeError as exc:
        raise WebhookConfigError(f"{SETTING}.urls: not a JSON list: {exc.msg}") from None


def _read_secret(
    secret: SecretStr | None, secret_file: Path | None, *, setting: str
) -> SecretStr | None:
    """`secret` or the contents of `secret_file` (not both); None when neither is set
    (or it is empty)."""
    if secret is not None and secret_file is not None:
        raise WebhookConfigError(f"{setting}.secret and {setting}.secret_file: set only one")
    if secret_file is not None:
        try:
            secret = read_secret_file(secret_file, setting=f"{setting}.secret_file")
        except ConfigError as exc:
            raise WebhookConfigError(str(exc)) from None
    return secret if secret is not None and secret.get_secret_value() else None


def _signed(urls: Sequence[str], secret: SecretStr | None) -> tuple[tuple[str, SecretStr], ...]:
    """Each URL with the secret that signs for it; URLs without one are a config error."""
    if not urls:
        return ()
    if secret is None:
        raise _missing_secret()
    return tuple((url, secret) for url in urls)


def _missing_secret() -> WebhookConfigError:
    return WebhookConfigError(
        f"{SETTING}.secret: missing (set {SETTING}.secret or {SETTING}.secret_file, "
        "or ZIMAGE_PLUGINS__WEBHOOK__SECRET): receivers need it to check the signature"
    )


def _pool(config: WebhookConfig) -> urllib3.PoolManager:
    if not config.verify_tls:
        return urllib3.PoolManager(cert_reqs="CERT_NONE")
    ca_certs = str(config.ca_bundle) if config.ca_bundle else None
    return urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca_certs)


def _host(url: str) -> str:
    parsed = parse_url(url)
    return f"{parsed.host}:{parsed.port}" if parsed.port else str(parsed.host)


def _scrub(text: str, url: str, host: str) -> str:
    """A transport error's text without the URL's path and query (a receiver may put a
    token there), cut short."""
    path = parse_url(url).request_uri
    cleaned = text.replace(url, host)
    if path != "/":
        cleaned = cleaned.replace(path, "/…")
    return cleaned[:_ERROR_DETAIL]
