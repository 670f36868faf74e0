"""The demo scenario that `scripts/demo.sh` runs against running workers.

    python -m zimage_pipeline.demo --run-id RUN --client-secrets-dir .local/secrets

1. `cms-publisher` publishes an interactive hero image on behalf of editor `alice`,
   with a social crop around a focal point besides the default thumbnail (the
   renditions plugin);
2. `bob` publishes a bulk batch that runs into his daily quota;
3. `carol` (auditor, no generation role) asks for an image;
4. `cms-publisher` sends a prompt naming a competitor's brand (the deny_list plugin
   refuses it: PROMPT_REFUSED, nothing charged);
5. `pim-sync` publishes a message that is not JSON (it must end in the DLQ);
6. `cms-publisher` publishes for `mia` (marketing: presets only) a listing tile made from
   the `ecommerce-hero` template, and then a free prompt for her (NOT_AUTHORIZED);
7. `cms-publisher` has the background of a product packshot replaced for `alice`
   (inpaint: the demo makes the photo and its mask and puts them in the CMS's input
   folder, `zimage-inputs/cms/`, which the policy grants it);
8. every request that reached a decision is also POSTed, signed, to the demo's own
   webhook receiver (the webhook plugin), which checks each signature.

The plugins' configuration is `config/demo-plugins.toml` (`plugin_tables`).

Every outcome is awaited with a timeout, shown in a table and compared with an explicit
expected table; the exit status is 1 if anything differs. Quotas are made deterministic
on the persistent ledger: bob's limits (and his team's) are set *relative to what is
already used* so exactly `--bob-allowed` images fit whatever earlier runs consumed, and
the overrides are removed again at the end. Request ids carry the run id, so every run
is new to the ledger and the audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from zimage_pipeline.broker import connect, connect_robust
from zimage_pipeline.demo_inputs import stage_packshot
from zimage_pipeline.demo_plugins import receiving
from zimage_pipeline.demo_table import Outcome, expected_outcomes, print_table
from zimage_pipeline.settings import Settings, load_settings
from zimage_pipeline.worker.topology import results_binding_key

DESIGN_TEAM = "cn=design-team,ou=groups,dc=example,dc=org"
TEAM_SLACK = 10  # the team budget stays above bob's own, so his quota is what binds
ACTOR = "zimage-demo"


@dataclass
class Plan:
    """Who publishes what; `kind` groups the rows of the expected table."""

    run_id: str
    bob_batch: int
    publications: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    # (kind, publisher, request id / message id, body)

    def add(self, kind: str, publisher: str, request_id: str, document: dict[str, Any]) -> None:
        document = {"request_id": request_id, "labels": {"demo.run": self.run_id}, **document}
        self.publications.append((kind, publisher, request_id, json.dumps(document).encode()))


def build_plan(
    run_id: str, bob_batch: int, packshot: tuple[dict[str, Any], dict[str, Any]] | None = None
) -> Plan:
    """`packshot`: references to the run's product photo and its background mask in the
    CMS's input folder (`demo_inputs.stage_packshot`); without them, no background step."""
    plan = Plan(run_id, bob_batch)
    small = {"width": 128, "height": 128, "steps": 2}
    plan.add(
        "hero",
        "cms-publisher",
        f"{run_id}-hero",
        {
            "on_behalf_of": "alice",
            "prompt": "Hero image: a lighthouse at dawn, 雾中的灯塔",
            "width": 256,
            "height": 256,
            "steps": 4,
            "format": "webp",
            "priority": "interactive",
            "renditions": ["social"],
            "focal_point": {"x": 0.7, "y": 0.4},
        },
    )
    for n in range(1, bob_batch + 1):
        plan.add(
            "bob batch",
            "bob",
            f"{run_id}-bob-{n}",
            {"on_behalf_of": "bob", "prompt": f"Catalogue tile {n}", "priority": "bulk", **small},
        )
    plan.add("carol", "carol", f"{run_id}-carol", {"on_behalf_of": "carol", "prompt": "x", **small})
    plan.add(
        "refused prompt",
        "cms-publisher",
        f"{run_id}-refused",
        {"on_behalf_of": "alice", "prompt": "Banner beating ＡＣＭＥ Corp's prices", **small},
    )
    plan.publications.append(
        ("malformed", "pim-sync", f"{run_id}-malformed", b"<sku>not json</sku>")
    )
    plan.add(
        "preset",
        "cms-publisher",
        f"{run_id}-preset",
        {
            "on_behalf_of": "mia",
            "template": {"id": "ecommerce-hero"},
            "variables": {"product": "Blue ceramic teapot", "angle": "front"},
            "width": 512,  # the template's listing-tile size
            "height": 512,
        },
    )
    plan.add(
        "free prompt",
        "cms-publisher",
        f"{run_id}-free",
        {"on_behalf_of": "mia", "prompt": "Anything I like", **small},
    )
    if packshot is not None:
        photo, mask = packshot
        plan.add(
            "background",
            "cms-publisher",
            f"{run_id}-background",
            {
                "on_behalf_of": "alice",
                "prompt": "on a sunny spring kitchen table, soft morning light",
                "task": "inpaint",
                "init_image": photo,
                "mask_image": mask,
                "steps": 2,
            },
        )
    return plan


# -- quotas ----------------------------------------------------------------------------


def _set_relative(ledger: Any, subject: str, allowed: int, note: str) -> tuple[Any, Any]:
    """Limits that leave exactly `allowed` images; returns the override it replaced."""
    from zimage_pipeline.ledger.quota_types import Window

    # Without policy limits, `usage` reports the subject's override (None: no override).
    status = ledger.usage(subject)
    previous = (status.window(Window.DAY).limit, status.window(Window.MONTH).limit)
    limits = {}
    for window in (Window.DAY, Window.MONTH):
        usage = status.window(window)
        limits[window] = max(0, usage.used + usage.reserved - usage.granted + allowed)
    ledger.set_limit(
        subject,
        images_per_day=limits[Window.DAY],
        images_per_month=limits[Window.MONTH],
        actor=ACTOR,
        note=note,
    )
    return previous


@contextmanager
def bob_quota(settings: Settings, allowed: int, run_id: str) -> Iterator[None]:
    """Exactly `allowed` more images for bob during the run; his overrides as they were
    before (usually none: the policy's limits) afterwards."""
    from zimage_pipeline.ledger.db import create_ledger_engine
    from zimage_pipeline.ledger.quota import QuotaLedger
    from zimage_pipeline.ledger.quota_types import team_subject, user_subject

    engine = create_ledger_engine(settings.database)
    ledger = QuotaLedger(engine)
    subjects = {user_subject("bob"): allowed, team_subject(DESIGN_TEAM): allowed + TEAM_SLACK}
    previous: dict[str, tuple[Any, Any]] = {}
    try:
        for subject, budget in subjects.items():
            previous[subject] = _set_relative(ledger, subject, budget, f"demo run {run_id}")
            print(f"quota: {subject} may use {budget} more images today")
        yield
    finally:
        for subject, (day, month) in previous.items():
            ledger.set_limit(
                subject, images_per_day=day, images_per_month=month, actor=ACTOR, note="demo end"
            )
        engine.dispose()


# -- broker ----------------------------------------------------------------------------


async def _collect(
    tap: asyncio.Queue[dict[str, Any]], wanted: set[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Results by request id until every wanted one arrived (the malformed one has id '')."""
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while not wanted <= results.keys():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            document = await asyncio.wait_for(tap.get(), timeout=min(left, 5.0))
        except TimeoutError:
            print(
                f"  ... {len(results)}/{len(wanted)} outcomes after {time.monotonic() - started:.0f} s"
            )
            continue
        rid = document.get("request_id", "")
        # A message too broken to name its request is answered with an empty id.
        unnamed_ok = rid != "" or document.get("reason") == "INVALID_REQUEST"
        if rid in wanted and rid not in results and unnamed_ok:
            results[rid] = document
            print(
                f"  {len(results)}/{len(wanted)} {rid or '(malformed)'}: {document['status']}"
                + (f" {document['reason']}" if document.get("reason") else "")
            )
    return results


async def _in_dlq(settings: Settings, message_id: str) -> bool:
    """Whether the DLQ holds `message_id`; ours is removed, others go back untouched.

    Read with the worker's account: clients may not read the DLQ."""
    connection = await connect(settings.broker, name="zimage-demo dlq check")
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{settings.broker.requests_queue}.dlq", ensure=False)
        found = False
        # Messages taken without ack stay held by this channel and return to the queue
        # when it closes, so others' dead letters are left where they were.
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            if message.message_id == message_id:
                found = True
                reason = (message.headers or {}).get("x-zimage-reason")
                print(f"dlq: {message_id} found (x-zimage-reason={reason!s})")
                await message.ack()
        await channel.close()
    return found


def _webhook_of(settings: Settings) -> tuple[str, bytes]:
    """The demo webhook's URL and secret, from the `[plugins.webhook]` table."""
    table = settings.plugins.tables().get("webhook")
    if not table or not table.get("enabled"):
        raise SystemExit("the demo needs [plugins.webhook] (config/demo-plugins.toml)")
    secret = table.get("secret")
    if secret is None:
        secret = Path(table["secret_file"]).read_text(encoding="utf-8").removesuffix("\n")
    return str(table["urls"][0]), str(secret).encode()


async def run_scenario(
    settings: Settings,
    *,
    secrets_dir: Path,
    run_id: str,
    bob_batch: int = 5,
    timeout_s: float = 180.0,
    run_sinks: Callable[[], Any] | None = None,
) -> list[Outcome]:
    """Publish the plan, wait for every outcome and its webhook delivery, return the rows
    of the results table. `run_sinks`: the outbox's job, for a worker without its
    periodic jobs (the tests' in-process worker)."""
    url, secret = _webhook_of(settings)
    with receiving(url, secret) as receiver:
        rows = await _publish_and_collect(settings, secrets_dir, run_id, bob_batch, timeout_s)
        named = {r.request_id for r in rows if r.kind != "malformed"}
        print(f"waiting for the webhook deliveries of {len(named)} results")
        await asyncio.to_thread(receiver.wait_for, named, 60.0, poll=run_sinks)
    for rid in sorted(named):
        deliveries = receiver.of(rid)
        signed = all(d.signed for d in deliveries)
        rows.append(Outcome.webhook(rid, len(deliveries), signed))
    return rows


async def _publish_and_collect(
    settings: Settings, secrets_dir: Path, run_id: str, bob_batch: int, timeout_s: float
) -> list[Outcome]:
    packshot = await asyncio.to_thread(stage_packshot, settings, run_id)
    plan = build_plan(run_id, bob_batch, packshot)
    broker = settings.broker
    tap: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    channels: dict[str, AbstractChannel] = {}
    async with AsyncExitStack() as stack:
        for user in sorted({publisher for _, publisher, _, _ in plan.publications}):
            password = (secrets_dir / f"amqp_{user}").read_text(encoding="utf-8").strip()
            connection = await connect_robust(
                broker, login=user, password=password, name=f"zimage-demo {user}"
            )
            await stack.enter_async_context(connection)
            channels[user] = await connection.channel(publisher_confirms=True)

        async def on_result(message: AbstractIncomingMessage) -> None:
            async with message.process():
                await tap.put(json.loads(message.body))

        # Bound before anything is published: a fast answer cannot be missed. Each
        # account reads only the results of what it published (topic permissions).
        for user, channel in channels.items():
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            exchange = await channel.get_exchange(broker.results_exchange, ensure=False)
            await queue.bind(exchange, results_binding_key(user))
            await queue.consume(on_result)
        for _kind, user, rid, body in plan.publications:
            exchange = await channels[user].get_exchange(broker.requests_exchange, ensure=False)
            document = json.loads(body) if body.startswith(b"{") else {}
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=rid,
                    user_id=user,
                ),
                routing_key=document.get("priority", "standard"),
            )
        print(f"published {len(plan.publications)} messages; waiting for their outcomes")
        wanted = {rid for kind, _, rid, _ in plan.publications if kind != "malformed"} | {""}
        results = await _collect(tap, wanted, timeout_s)
    malformed_id = f"{run_id}-malformed"
    dead_lettered = await _in_dlq(settings, malformed_id)
    rows = []
    for kind, user, rid, body in plan.publications:
        malformed = kind == "malformed"
        on_behalf_of = "" if malformed else str(json.loads(body)["on_behalf_of"])
        result = results.get("" if malformed else rid)
        dlq = dead_lettered if malformed else None
        rows.append(Outcome.of(kind, user, rid, result, on_behalf_of=on_behalf_of, dlq=dlq))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimage_pipeline.demo", description=__doc__)
    parser.add_argument("--run-id", required=True, help="Prefix of this run's request ids.")
    parser.add_argument(
        "--client-secrets-dir",
        type=Path,
        required=True,
        help="Directory with the demo clients' AMQP passwords (amqp_<user> files).",
    )
    parser.add_argument("--bob-allowed", type=int, default=3, help="Images bob may still make.")
    parser.add_argument("--bob-batch", type=int, default=5, help="Requests in bob's batch.")
    parser.add_argument("--timeout", type=float, default=180.0, help="Seconds to wait in all.")
    args = parser.parse_args(argv)
    settings = load_settings()
    with bob_quota(settings, args.bob_allowed, args.run_id):
        rows = asyncio.run(
            run_scenario(
                settings,
                secrets_dir=args.client_secrets_dir,
                run_id=args.run_id,
                bob_batch=args.bob_batch,
                timeout_s=args.timeout,
            )
        )
    expected = expected_outcomes(bob_allowed=args.bob_allowed, bob_batch=args.bob_batch)
    return print_table(rows, expected)


if __name__ == "__main__":
    sys.exit(main())
