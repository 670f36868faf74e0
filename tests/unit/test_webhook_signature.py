"""The webhook sink's signature, canonical body, replay window and configuration."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.ledger.outbox import RetryPolicy
from zimage_pipeline.plugins.api import SinkDelivery
from zimage_pipeline.plugins.webhook import (
    WebhookConfig,
    WebhookDeliveryError,
    WebhookSink,
    canonical_body,
    create,
    sign,
    verify_signature,
)

SECRET = b"whsec-test"
TS = "1700000000"
EVENT = {"z": None, "b": [1, 2], "attempt": "ü"}
BODY = '{"attempt":"ü","b":[1,2],"z":null}'.encode()
# Computed outside Python: printf '%s' '1700000000.<BODY>' | openssl dgst -sha256 -hmac whsec-test
KNOWN_SIGNATURE = "v1=e5e380ed50be3cbb0bcd2266bf5dcf714a3819d7cc57e0a3fb667f128f3d14d8"


def test_the_body_is_canonical_json_sorted_compact_utf8() -> None:
    assert canonical_body(EVENT) == BODY
    reordered = dict(reversed(list(EVENT.items())))
    assert canonical_body(reordered) == BODY


def test_the_body_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError, match="JSON"):
        canonical_body({"timing": float("nan")})


def test_signature_known_answer() -> None:
    assert sign(SECRET, timestamp=TS, body=BODY) == KNOWN_SIGNATURE


def test_the_sink_signs_each_attempt_with_its_headers() -> None:
    sink = WebhookSink(
        WebhookConfig(urls=["http://127.0.0.1:9/hook"]),
        SecretStr(SECRET.decode()),
        clock=lambda: 1700000000.9,  # whole seconds: the fraction is dropped
    )
    delivery = SinkDelivery(delivery_id="d" * 32, request_id="r1", attempt=3, event=EVENT)
    assert sink.headers(delivery, BODY) == {
        "Content-Type": "application/json",
        "X-Zimage-Delivery": "d" * 32,
        "X-Zimage-Attempt": "3",
        "X-Zimage-Timestamp": TS,
        "X-Zimage-Signature": KNOWN_SIGNATURE,
    }


def verify(
    *,
    secret: bytes = SECRET,
    timestamp: str = TS,
    body: bytes = BODY,
    signature: str = KNOWN_SIGNATURE,
    now: float | None = float(TS) + 10,
    tolerance_s: float = 300,
) -> bool:
    return verify_signature(
        secret,
        timestamp=timestamp,
        body=body,
        signature=signature,
        tolerance_s=tolerance_s,
        now=now,
    )


def test_a_valid_signature_verifies() -> None:
    assert verify()


@pytest.mark.parametrize(
    "overrides",
    [
        {"body": BODY.replace(b"[1,2]", b"[1,3]")},
        {"body": BODY + b" "},  # same JSON, other bytes: the bytes are signed
        {"timestamp": "1700000001", "now": 1700000001.0},
        {"secret": b"whsec-other"},
        {"signature": KNOWN_SIGNATURE[:-1] + "0"},
        {"signature": KNOWN_SIGNATURE.removeprefix("v1=")},
        {"signature": ""},
        {"timestamp": "17e8"},
        {"timestamp": "-1700000000"},
    ],
    ids=[
        "body",
        "whitespace",
        "timestamp",
        "secret",
        "signature",
        "no-version",
        "empty",
        "not-digits",
        "negative",
    ],
)
def test_tampering_is_rejected(overrides: dict[str, Any]) -> None:
    assert not verify(**overrides)


@pytest.mark.parametrize(
    ("offset_s", "accepted"),
    [(0, True), (299, True), (-299, True), (300, True), (301, False), (-301, False)],
)
def test_the_replay_window(offset_s: int, accepted: bool) -> None:
    assert verify(now=float(TS) + offset_s) is accepted


def test_a_narrower_window_is_the_receivers_choice() -> None:
    assert not verify(now=float(TS) + 10, tolerance_s=5)


def test_several_signatures_for_a_rotated_secret() -> None:
    rotated = f"v1={'0' * 64}, {KNOWN_SIGNATURE}"
    assert verify(signature=rotated)


# -- configuration -------------------------------------------------------------------------


def test_a_missing_secret_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"plugins\.webhook\.secret") as caught:
        create({"urls": ["https://cms.example/hook"]})
    assert isinstance(caught.value, ConfigError)  # the registry's error for a bad table


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"urls": []}, "plugins.webhook.urls"),
        ({"urls": ["ftp://cms.example/hook"]}, "plugins.webhook.urls"),
        ({"urls": ["https://user:pw@cms.example/hook"]}, "plugins.webhook.urls"),
        ({"urls": ["https://cms.example"], "retries": 3}, "plugins.webhook.retries"),
        ({"urls": ["https://cms.example"], "timeout_s": 0}, "plugins.webhook.timeout_s"),
        ({"urls": ["https://cms.example"], "max_attempts": 0}, "plugins.webhook.max_attempts"),
    ],
)
def test_a_bad_table_names_the_key(table: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as caught:
        create({"secret": "s", **table})
    assert "pw" not in str(caught.value)


def test_secret_and_secret_file_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="set only one"):
        create({"urls": ["https://cms.example"], "secret": "s", "secret_file": str(path)})


def test_the_secret_file_is_read_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET.decode() + "\n", encoding="utf-8")
    sink = create({"urls": ["https://cms.example"], "secret_file": str(path), "enabled": True})
    delivery = SinkDelivery(delivery_id="d" * 32, request_id="r1", attempt=1, event=EVENT)
    headers = sink.headers(delivery, BODY)
    assert verify(
        timestamp=headers["X-Zimage-Timestamp"], now=None, signature=headers["X-Zimage-Signature"]
    )


def test_an_unreadable_secret_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.webhook\.secret_file"):
        create({"urls": ["https://cms.example"], "secret_file": str(tmp_path / "absent")})


def test_settings_from_the_environment_arrive_as_text() -> None:
    sink = create(
        {
            "urls": "https://a.example/h, https://b.example/h",
            "secret": "s",
            "max_attempts": "3",
            "backoff_base_s": "0.5",
        }
    )
    assert sink.urls == ("https://a.example/h", "https://b.example/h")
    assert sink.retry_policy == RetryPolicy(max_attempts=3, backoff_base_s=0.5, backoff_max_s=300)
    assert create({"urls": '["https://c.example/h"]', "secret": "s"}).urls == (
        "https://c.example/h",
    )


def test_a_failed_post_names_the_host_never_the_secret_or_path() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = create(
        {"urls": [f"http://127.0.0.1:{port}/hooks/token-abc?key=k1"], "secret": "s3cr3t-value"}
    )
    delivery = SinkDelivery(delivery_id="d" * 32, request_id="r1", attempt=2, event=EVENT)
    with pytest.raises(WebhookDeliveryError) as caught:
        sink.deliver(delivery)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "attempt 2" in message
    for hidden in ("s3cr3t-value", "token-abc", "key=k1"):
        assert hidden not in message


# -- routes: each tenant's results to its own receivers, signed with its own secret --------

ROUTED = {
    "publishers": {
        "cms-publisher": {"urls": ["https://cms.example/hook"], "secret": "cms-secret"},
        "pim-sync": {"urls": ["https://pim.example/hook"]},  # signs with the shared one
    },
    "secret": "shared-secret",
}


def _targets(sink: WebhookSink, publisher: str | None) -> list[tuple[str, str]]:
    return [(url, secret.get_secret_value()) for url, secret in sink.targets(publisher)]


def test_each_publisher_gets_its_own_route_only() -> None:
    sink = create(ROUTED)
    assert _targets(sink, "cms-publisher") == [("https://cms.example/hook", "cms-secret")]
    assert _targets(sink, "pim-sync") == [("https://pim.example/hook", "shared-secret")]
    # A publisher without a route, with no URLs for everyone, gets no webhook at all.
    assert _targets(sink, "bob") == [] and not sink.wants("bob") and not sink.wants(None)
    assert sink.wants("cms-publisher")
    # URLs for everyone come first, signed with the shared secret, then the route's.
    both = create({**ROUTED, "urls": ["https://router.internal/zimage"]})
    assert _targets(both, "cms-publisher") == [
        ("https://router.internal/zimage", "shared-secret"),
        ("https://cms.example/hook", "cms-secret"),
    ]
    assert _targets(both, "bob") == [("https://router.internal/zimage", "shared-secret")]


def test_a_route_signs_with_its_own_secret() -> None:
    sink = create(ROUTED)
    delivery = SinkDelivery("d" * 32, "r1", 1, EVENT, publisher="cms-publisher")
    [(_url, secret)] = sink.targets("cms-publisher")
    headers = sink.headers(delivery, BODY, secret=secret)
    assert verify_signature(
        b"cms-secret",
        timestamp=headers["X-Zimage-Timestamp"],
        body=BODY,
        signature=headers["X-Zimage-Signature"],
    )
    assert not verify_signature(
        b"shared-secret",
        timestamp=headers["X-Zimage-Timestamp"],
        body=BODY,
        signature=headers["X-Zimage-Signature"],
    )


def test_routes_every_one_with_its_secret_need_no_shared_secret() -> None:
    routes = {"a": {"urls": ["https://a.example/h"], "secret": "sa"}}
    assert _targets(create({"publishers": routes}), "a") == [("https://a.example/h", "sa")]
    # A route without a secret of its own needs the shared one, and says so.
    with pytest.raises(ConfigError, match=r"plugins\.webhook\.secret: missing"):
        create({"publishers": {"a": {"urls": ["https://a.example/h"]}}})


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({}, "plugins.webhook.urls"),
        ({"publishers": {"a": {"urls": []}}}, "plugins.webhook.publishers.a.urls"),
        ({"publishers": {"a": {"urls": ["ftp://a.example"]}}}, "plugins.webhook.publishers.a.urls"),
        ({"publishers": {"a": {"urls": ["https://a.example"], "x": 1}}}, "publishers.a.x"),
    ],
)
def test_a_bad_route_names_the_key(table: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        create({"secret": "s", **table})


def test_plugins_list_masks_a_routes_secret() -> None:
    from zimage_pipeline.plugins.registry import masked

    shown = masked(ROUTED)
    assert "cms-secret" not in str(shown) and "shared-secret" not in str(shown)
    assert shown["publishers"]["cms-publisher"]["urls"] == ["https://cms.example/hook"]
