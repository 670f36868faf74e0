"""Plugins on the real stack (RabbitMQ, slapd, SQLite/PostgreSQL, SeaweedFS, the tiny
model), wired as `zimage-pipeline worker` wires them: a refused prompt, and a third-party
plugin installed from its own package into a worker process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from tests.conftest import PROJECT_ROOT
from tests.integration.fault_matrix.stack import read_leftover
from tests.integration.test_end_to_end import (
    _worker_env,
    e2e_settings,
    request,
    submit_once_a_worker_is_up,
    tiny_model,
)
from tests.integration.test_webhook_outbox import Receiver, receiver, serving
from tests.integration.worker_harness import (
    built,
    client,
    client_password,
    delete_private_topology,
    running_worker,
)
from zimage_pipeline.ledger.models import AuditEventRow, Job, QuotaEntry
from zimage_pipeline.ledger.outbox import SinkOutbox
from zimage_pipeline.plugins.webhook import verify_signature
from zimage_pipeline.provenance import read_provenance
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.wiring import Wiring, build
from zimage_pipeline.worker.periodic import RESULT_SINKS_JOB

pytestmark = pytest.mark.integration
__all__ = ["receiver", "tiny_model"]  # fixtures shared with the modules they come from

DENY_LIST = {
    "enabled": True,
    "rules": [
        {"id": "house-words", "words": ["forbidden fruit"]},
        {"id": "competitors", "patterns": [r"\bacme\s*corp\b"]},
    ],
}


def with_plugins(settings: Settings, plugins: dict[str, Any]) -> Settings:
    return load_settings(**settings.model_dump(exclude={"plugins"}), plugins=plugins)


@pytest.fixture
async def filtered_stack(
    tiny_model: Path, ledger_url: str
) -> AsyncIterator[tuple[Settings, Wiring]]:
    settings = with_plugins(e2e_settings(tiny_model, ledger_url), {"deny_list": DENY_LIST})
    async with built(settings) as wiring:
        yield settings, wiring


def ledger_rows(
    settings: Settings, request_id: str
) -> tuple[str, list[str], list[tuple[str, str]]]:
    """The job's status, its quota entries' kinds and its audit events (type, payload)."""
    engine = create_engine(settings.database.url)
    try:
        with engine.connect() as conn:
            status = conn.execute(select(Job.status).where(Job.request_id == request_id)).scalar()
            entries = (
                conn.execute(select(QuotaEntry.kind).where(QuotaEntry.request_id == request_id))
                .scalars()
                .all()
            )
            events = conn.execute(
                select(AuditEventRow.event_type, AuditEventRow.payload)
                .where(AuditEventRow.request_id == request_id)
                .order_by(AuditEventRow.seq)
            ).all()
    finally:
        engine.dispose()
    return str(status), sorted(entries), [(e, p) for e, p in events]


async def test_a_refused_prompt_is_answered_once_uncharged_and_audited(
    filtered_stack: tuple[Settings, Wiring],
) -> None:
    settings, wiring = filtered_stack
    async with running_worker(settings, wiring.ports), client(settings, "alice") as alice:
        # Fullwidth letters and a zero-width space: the rule's words after normalisation.
        refused = "a \uff26\uff4f\uff52\uff42\uff49\uff44\uff44\uff45\uff4e fru\u200bit still life"
        await alice.publish(request("pf-refused", "alice", prompt=refused))
        await alice.publish(request("pf-acme", "alice", prompt="logo of ACME  Corp"))
        await alice.publish(request("pf-clean", "alice", prompt="fresh fruit on a table"))
        results = {r["request_id"]: r for r in await alice.results_for(3, wait_s=120)}
        with pytest.raises(TimeoutError):  # one result per request, nothing more
            await alice.next_result(wait_s=2)

    assert {rid: (r["status"], r.get("reason")) for rid, r in results.items()} == {
        "pf-refused": ("rejected", "PROMPT_REFUSED"),
        "pf-acme": ("rejected", "PROMPT_REFUSED"),
        "pf-clean": ("succeeded", None),
    }
    assert "house-words" in results["pf-refused"]["message"]
    assert "forbidden" not in results["pf-refused"]["message"]  # the rule id, never the list
    assert "competitors" in results["pf-acme"]["message"]
    assert await read_leftover(settings) == dict.fromkeys(await read_leftover(settings), 0)

    status, entries, events = ledger_rows(settings, "pf-refused")
    assert (status, entries) == ("rejected", [])  # nothing reserved, nothing charged
    assert [e for e, _ in events] == ["received", "denied", "published"]
    denied = json.loads(events[1][1])
    assert denied["reason"] == "PROMPT_REFUSED"
    assert (denied["rule_id"], denied["plugin"]) == ("house-words", "deny_list")
    status, entries, _ = ledger_rows(settings, "pf-clean")
    assert status == "succeeded" and entries.count("commit") == 1


def install_example_plugin(target: Path) -> None:
    """`pip install` the example package from its own directory, as an operator would,
    into a directory of this test (not the project's environment)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PROJECT_ROOT / "examples" / "zimage-plugin-watermark"),
        ],
        check=True,
        timeout=300,
    )


def test_a_third_party_plugin_from_its_own_package_serves_a_request(
    tiny_model: Path, sqlite_url: str, tmp_path: Path
) -> None:
    install_example_plugin(tmp_path / "site")
    settings = e2e_settings(tiny_model, sqlite_url)
    env = _worker_env(settings)
    env["PYTHONPATH"] = str(tmp_path / "site")
    listed = subprocess.run(
        [sys.executable, "-m", "zimage_pipeline.cli", "plugins", "list", "--json"],
        cwd=PROJECT_ROOT,
        env={**env, "ZIMAGE_PLUGINS__WATERMARK__ENABLED": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["watermark"]["distribution"] == "zimage-plugin-watermark"
    assert rows["watermark"]["version"] == "0.1.0" and rows["watermark"]["enabled"]
    assert not rows["deny_list"]["enabled"]

    env.update(
        {
            "ZIMAGE_PLUGINS__WATERMARK__ENABLED": "true",
            "ZIMAGE_PLUGINS__WATERMARK__TEXT": "ACME preview",
            "ZIMAGE_CLIENT__USERNAME": "alice",
            "ZIMAGE_CLIENT__PASSWORD": client_password("alice"),
        }
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "zimage_pipeline.cli", "worker"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    result: dict[str, Any] | str
    try:
        result = _submit_when_ready(env)
    except subprocess.TimeoutExpired as exc:
        result = f"no answer: {exc}"
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=60)
        asyncio.run(delete_private_topology(settings))
    assert not isinstance(result, str) and result["status"] == "succeeded", (result, output[-4000:])
    (rendition,) = result["images"][0]["renditions"]
    assert (rendition["name"], rendition["plugin"]) == ("watermarked", "watermark")
    data = ObjectStore(settings.storage).get_object(rendition["key"])
    assert hashlib.sha256(data).hexdigest() == rendition["sha256"]
    assert rendition["key"].endswith("/0/watermarked.png")


def _submit_when_ready(env: dict[str, str]) -> dict[str, Any]:
    submitted = submit_once_a_worker_is_up(
        env,
        [
            "--prompt",
            "a lighthouse",
            "--request-id",
            "wm-1",
            "--width",
            "128",
            "--height",
            "128",
            "--steps",
            "2",
        ],
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return dict(json.loads(submitted.stdout))


RENDITIONS = {
    "enabled": True,
    "default": ["thumb"],
    "allow_request": True,
    "presets": {
        "thumb": {"width": 64, "fit": "fit", "format": "webp"},
        "social": {"width": 96, "height": 50, "fit": "crop", "format": "jpeg"},
        "square": {"width": 48, "height": 48, "fit": "crop", "format": "avif"},
    },
}
WEBHOOK_SECRET = "whsec-e2e"


async def test_renditions_and_a_signed_webhook_on_the_real_stack(
    tiny_model: Path, ledger_url: str, receiver: Receiver
) -> None:
    """One request through the worker with the renditions and webhook plugins enabled:
    each rendition stored beside its image with its own digest and the source's
    provenance, listed in the result and the audit record; the result POSTed once,
    signed, from the ledger's outbox; an unknown preset refused before any charge."""
    plugins = {
        "renditions": RENDITIONS,
        "webhook": {"enabled": True, "urls": [receiver.url], "secret": WEBHOOK_SECRET},
    }
    settings = with_plugins(e2e_settings(tiny_model, ledger_url), plugins)
    wiring = build(settings)
    try:
        async with running_worker(settings, wiring.ports), client(settings, "alice") as alice:
            await alice.publish(
                request(
                    "rd-1",
                    "alice",
                    renditions=["social", "square"],
                    focal_point={"x": 0.8, "y": 0.5},
                )
            )
            await alice.publish(request("rd-bad", "alice", renditions=["poster"]))
            results = {r["request_id"]: r for r in await alice.results_for(2, wait_s=120)}
            with pytest.raises(TimeoutError):
                await alice.next_result(wait_s=2)
        (sinks_job,) = [job for job in wiring.periodic if job.name == RESULT_SINKS_JOB]
        await asyncio.to_thread(sinks_job.run)
    finally:
        for close in wiring.closers:
            close()
        await delete_private_topology(settings)

    bad = results["rd-bad"]
    assert (bad["status"], bad["reason"]) == ("rejected", "INVALID_REQUEST")
    assert "poster" in bad["message"]
    assert ledger_rows(settings, "rd-bad")[:2] == ("rejected", [])

    good = results["rd-1"]
    assert good["status"] == "succeeded", good
    (image,) = good["images"]
    store = ObjectStore(settings.storage)
    source = store.get_object(image["key"])
    by_name = {r["name"]: r for r in image["renditions"]}
    assert set(by_name) == {"thumb", "social", "square"}
    expected = {"thumb": ("webp", 64, 64), "social": ("jpeg", 96, 50), "square": ("avif", 48, 48)}
    for name, (fmt, width, height) in expected.items():
        rendition = by_name[name]
        assert (rendition["format"], rendition["width"], rendition["height"]) == (
            fmt,
            width,
            height,
        )
        assert rendition["plugin"] == "renditions"
        data = store.get_object(rendition["key"])
        assert hashlib.sha256(data).hexdigest() == rendition["sha256"]
        assert rendition["key"].rsplit("/", 2)[0] == image["key"].rsplit("/", 1)[0]
        report = read_provenance(data)
        assert report.marked_as_ai, (name, report.xmp)
        derived_from = report.xmp["xmpMM:DerivedFrom/stRef:instanceID"]
        assert derived_from == f"nih:sha-256;{hashlib.sha256(source).hexdigest()}"
        assert report.c2pa.verified, (name, report.c2pa)
        assert [i["relationship"] for i in report.c2pa.ingredients] == ["parentOf"]

    status, entries, events = ledger_rows(settings, "rd-1")
    assert status == "succeeded" and entries.count("commit") == 1
    stored = json.loads(dict(events)["stored"])
    recorded = {r["key"]: r["sha256"] for r in stored["renditions"]}
    assert recorded == {r["key"]: r["sha256"] for r in by_name.values()}

    # The webhook: the result event, once, signed; the AMQP result is the source of truth.
    posts = [p for p in receiver.requests if json.loads(p.body)["request_id"] == "rd-1"]
    (post,) = posts
    assert json.loads(post.body) == good
    assert verify_signature(
        WEBHOOK_SECRET.encode(),
        timestamp=post.headers["X-Zimage-Timestamp"],
        body=post.body,
        signature=post.headers["X-Zimage-Signature"],
    )
    assert post.headers["X-Zimage-Attempt"] == "1"


@pytest.fixture
def other_receiver() -> Iterator[Receiver]:
    """A second tenant's receiver."""
    with serving() as state:
        yield state


async def test_webhooks_route_each_tenants_results_to_its_own_receiver(
    tiny_model: Path, ledger_url: str, receiver: Receiver, other_receiver: Receiver
) -> None:
    """Through the worker: alice's results go to alice's receiver, signed with her
    secret; the CMS's to the CMS's; bob (no route) gets no webhook and nothing queued."""
    plugins = {
        "webhook": {
            "enabled": True,
            "publishers": {
                "alice": {"urls": [receiver.url], "secret": "alice-secret"},
                "cms-publisher": {"urls": [other_receiver.url], "secret": "cms-secret"},
            },
        }
    }
    settings = with_plugins(e2e_settings(tiny_model, ledger_url), plugins)
    wiring = build(settings)
    try:
        async with (
            running_worker(settings, wiring.ports),
            client(settings, "alice") as alice,
            client(settings, "cms-publisher") as cms,
            client(settings, "bob") as bob,
        ):
            await alice.publish(request("route-alice", "alice"))
            await cms.publish(request("route-cms", "alice"))
            await bob.publish(request("route-bob", "alice"))  # refused: bob may not delegate
            assert (await alice.result_of("route-alice", 120))["status"] == "succeeded"
            assert (await cms.result_of("route-cms", 120))["status"] == "succeeded"
            assert (await bob.result_of("route-bob", 60))["reason"] == "DELEGATION_NOT_ALLOWED"
        (sinks_job,) = [job for job in wiring.periodic if job.name == RESULT_SINKS_JOB]
        await asyncio.to_thread(sinks_job.run)
        ledger = create_engine(settings.database.url)
        try:
            assert SinkOutbox(ledger).deliveries("route-bob") == []
            assert len(SinkOutbox(ledger).deliveries("route-alice")) == 1
        finally:
            ledger.dispose()
    finally:
        for close in wiring.closers:
            close()
        await delete_private_topology(settings)

    def posted(to: Receiver) -> list[str]:
        return [json.loads(r.body)["request_id"] for r in to.requests]

    assert posted(receiver) == ["route-alice"]
    assert posted(other_receiver) == ["route-cms"]
    for to, secret in ((receiver, b"alice-secret"), (other_receiver, b"cms-secret")):
        [post] = to.requests
        assert verify_signature(
            secret,
            timestamp=post.headers["X-Zimage-Timestamp"],
            body=post.body,
            signature=post.headers["X-Zimage-Signature"],
        )
