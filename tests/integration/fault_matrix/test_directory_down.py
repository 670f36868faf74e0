"""Case 5: slapd stopped. Requests that arrive while the directory is down are retried,
never authorized on a guess: no reservation, no generation, no result. When slapd is
back they are answered as the directory says (a user without the generation role is
still refused)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fault_matrix.checker import assert_invariants, read_objects
from tests.integration.fault_matrix.stack import (
    case_stack,
    matrix_settings,
    request,
    wait_until,
    wired,
)
from tests.integration.private_slapd import PrivateSlapd
from tests.integration.worker_harness import client, running_worker
from zimage_pipeline.storage import ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[PrivateSlapd]:
    server = PrivateSlapd(tmp_path / "ldap")
    server.start()
    try:
        server.seed()
        yield server
    finally:
        server.stop()


async def test_directory_down_runs_nothing_unauthorized_and_resumes(
    tiny_model: Path, postgres_url: str, slapd: PrivateSlapd
) -> None:
    settings = matrix_settings(
        tiny_model,
        postgres_url,
        directory={
            "url": slapd.url,
            "ca_cert_file": str(slapd.ca_cert),
            "bind_password_file": str(slapd.bind_password_file),
            # No cache: every request asks the directory (a warm cache would answer
            # known users through a short outage, by design).
            "cache_ttl_s": 0,
            "negative_cache_ttl_s": 0,
            "connect_timeout_s": 1,
            "search_timeout_s": 2,
        },
        worker={"max_attempts": 60},  # 1 s apart: the outage must not spend the budget
    )
    during = {
        "ldap-down-alice-1": "alice",
        "ldap-down-alice-2": "alice",
        "ldap-down-carol": "carol",
    }
    async with (
        case_stack(settings) as (tap, ledger),
        wired(settings) as wiring,
        running_worker(settings, wiring.ports, worker_id="asker"),
        client(settings, "alice") as alice,
        client(settings, "carol") as carol,
    ):
        await alice.publish(request("ldap-before"))
        await tap.wait_for("ldap-before")

        slapd.stop()
        for rid, user in during.items():
            await (alice if user == "alice" else carol).publish(request(rid, on_behalf_of=user))
        # Each has been tried, refused for want of an answer, and tried again.
        await wait_until(
            lambda: all((ledger.job(r) or ("", 0))[1] >= 3 for r in during),
            "three attempts each while the directory is down",
        )
        objects_before = read_objects(ObjectStore(settings.storage), settings.storage.prefix)
        for rid in during:
            assert ledger.status(rid) == "received", rid  # never authorized
            assert ledger.reservation_state(rid) is None, rid  # nothing reserved
            assert "authorized" not in ledger.event_types(rid), rid
            assert tap.of(rid) == [], rid  # no answer on a guess
        assert len(objects_before) == 2  # still only ldap-before's image and record

        slapd.start()
        await tap.wait_for(*during, timeout_s=60)
    outcome = {r: (tap.first(r)["status"], tap.first(r).get("reason")) for r in during}
    assert outcome == {
        "ldap-down-alice-1": ("succeeded", None),
        "ldap-down-alice-2": ("succeeded", None),
        "ldap-down-carol": ("rejected", "NOT_AUTHORIZED"),
    }
    assert_invariants(settings, tap, expected={"ldap-before", *during})
