"""Test support: `zimage-pipeline worker` as it runs in production, with faults injected.

    python -m tests.integration.fault_matrix.fault_worker

Settings load the normal way (environment, plus the case's overrides as JSON in
ZIMAGE_FAULT_OVERRIDES), `wiring.build` binds the real adapters, `run_worker` runs the
real consumer. ZIMAGE_FAULT (JSON) wraps ports or patches the consumer, in this process
only (the production package knows nothing of it):

    generate_delay_s   sleep this long in every generation (makes "mid-generation" last)
    crash_on_prompt    SIGKILL when asked to generate a prompt containing this text (a
                       request that kills every worker that runs it)
    hang_on_prompt     never return when asked to generate a prompt containing this text
                       (a hung GPU: the generation's time limit must end the process)
    kill               "after_store"    SIGKILL once the objects are stored, before the
                                        ledger commit
                       "before_publish" SIGKILL once the ledger has the result, before it
                                        is published
                       "after_publish"  SIGKILL once the broker confirmed the result,
                                        before the delivery is acked
                       "mid_renditions" SIGKILL once the first rendition object is
                                        uploaded (others may be in flight), before
                                        the audit record and the ledger commit
                       "mid_webhook"    SIGKILL once a webhook POST was answered, before
                                        the outbox records the delivery

Each fault prints one `FAULT ...` line on stderr first, so the test's log shows where the
process died.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from zimage_pipeline.messages import GenerationResult, Status
from zimage_pipeline.ports import Engine, ImageSpec, ModelIdentity, RawImage, Store, StoredOutputs
from zimage_pipeline.settings import load_settings
from zimage_pipeline.wiring import Wiring

KILL_POINTS = ("after_store", "before_publish", "after_publish", "mid_renditions", "mid_webhook")


def die(where: str) -> None:
    print(f"FAULT SIGKILL {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultyEngine:
    """The real engine, slowed by `delay_s`, killed by a prompt holding `crash_on`, and/or
    stuck for good by a prompt holding `hang_on`."""

    def __init__(
        self, inner: Engine, *, delay_s: float = 0.0, crash_on: str = "", hang_on: str = ""
    ) -> None:
        self._inner = inner
        self._delay_s = delay_s
        self._crash_on = crash_on
        self._hang_on = hang_on

    @property
    def identity(self) -> ModelIdentity:
        return self._inner.identity

    def generate(self, specs: Sequence[ImageSpec]) -> list[RawImage]:
        if self._crash_on and any(self._crash_on in s.prompt for s in specs):
            die(f"generating a prompt with {self._crash_on!r}")
        if self._hang_on and any(self._hang_on in s.prompt for s in specs):
            print(f"FAULT hanging on a prompt with {self._hang_on!r}", file=sys.stderr, flush=True)
            threading.Event().wait()  # like a GPU call that never returns: nothing ends it
        if self._delay_s:
            print(f"FAULT generating {len(specs)} image(s) slowly", file=sys.stderr, flush=True)
            time.sleep(self._delay_s)
        return self._inner.generate(specs)


class KillAfterStore:
    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def store(self, **kwargs: Any) -> StoredOutputs:
        outputs = self._inner.store(**kwargs)
        die(f"after storing {len(outputs.images)} image(s), before the ledger commit")
        return outputs

    def discard(self, **kwargs: Any) -> list[str]:
        return self._inner.discard(**kwargs)


def patch_publishing(kill: str) -> None:
    """Wrap the consumer's confirmed publish of a succeeded result."""
    from zimage_pipeline.worker.consumer import Worker

    original = Worker._publish_result

    async def publish(self: Worker, result: GenerationResult, **kwargs: Any) -> None:
        if result.status is Status.SUCCEEDED and kill == "before_publish":
            die("after the ledger commit, before publishing the result")
        await original(self, result, **kwargs)
        if result.status is Status.SUCCEEDED and kill == "after_publish":
            die("after the broker confirmed the result, before the ack")

    setattr(Worker, "_publish_result", publish)  # noqa: B010 (a method, patched on purpose)


def patch_rendition_upload() -> None:
    """Die right after the first rendition object is in the store."""
    from zimage_pipeline.storage import ObjectStore

    original = ObjectStore.put_object

    def put_object(self: ObjectStore, key: str, data: bytes, **kwargs: Any) -> Any:
        stored = original(self, key, data, **kwargs)
        if "rendition" in (kwargs.get("metadata") or {}):
            die(f"after uploading the rendition {key.rsplit('/', 2)[-2:]}, mid-store")
        return stored

    setattr(ObjectStore, "put_object", put_object)  # noqa: B010 (patched on purpose)


def patch_webhook_delivery() -> None:
    """Die once a webhook POST was answered, before the outbox hears of it."""
    from zimage_pipeline.plugins.api import SinkDelivery
    from zimage_pipeline.plugins.webhook import WebhookSink

    original = WebhookSink.deliver

    def deliver(self: WebhookSink, delivery: SinkDelivery) -> None:
        original(self, delivery)
        die(f"after delivering {delivery.delivery_id} (attempt {delivery.attempt})")

    setattr(WebhookSink, "deliver", deliver)  # noqa: B010 (patched on purpose)


def inject(wiring: Wiring, faults: Mapping[str, Any]) -> Wiring:
    ports = wiring.ports
    delay_s, crash_on = float(faults.get("generate_delay_s", 0)), faults.get("crash_on_prompt")
    hang_on = faults.get("hang_on_prompt")
    if delay_s or crash_on or hang_on:
        faulty = FaultyEngine(
            ports.engine,
            delay_s=delay_s,
            crash_on=str(crash_on or ""),
            hang_on=str(hang_on or ""),
        )
        ports = replace(ports, engine=faulty)
    kill = faults.get("kill")
    if kill is not None and kill not in KILL_POINTS:
        raise SystemExit(f"unknown kill point {kill!r}; one of {KILL_POINTS}")
    if kill == "after_store":
        ports = replace(ports, store=KillAfterStore(ports.store))
    elif kill == "mid_renditions":
        patch_rendition_upload()
    elif kill == "mid_webhook":
        patch_webhook_delivery()
    elif kill is not None:
        patch_publishing(kill)
    return replace(wiring, ports=ports)


def main() -> int:
    from zimage_pipeline.observability import configure_logging
    from zimage_pipeline.wiring import build
    from zimage_pipeline.worker.runner import run_worker

    settings = load_settings(**json.loads(os.environ.get("ZIMAGE_FAULT_OVERRIDES", "{}")))
    faults = json.loads(os.environ.get("ZIMAGE_FAULT", "{}"))
    configure_logging(level=settings.logging.level, json_logs=settings.logging.json_logs)

    async def run() -> int:
        wiring = inject(await asyncio.to_thread(build, settings), faults)
        return await run_worker(settings, wiring)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
