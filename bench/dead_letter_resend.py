"""How long a delay-queue copy waits when its target queue could not take it at expiry.

    python bench/dead_letter_resend.py --intervals-ms 180000 10000

The delay queues (worker/topology.py) are quorum queues with at-least-once
dead-lettering. When a copy expires and its target cannot confirm it (here: the target
queue is unbound for 5 s, as a priority queue is unavailable while the broker recovers
from a restart), the broker keeps the copy and sends it again after
`dead_letter_worker_publisher_confirm_timeout`. For each interval given, this sets that
value on the local broker (`rabbitmqctl eval`, read by the dead-letter worker when it
starts: the app is restarted), publishes two copies with a 2 s TTL, rebinds the target
after 5 s and times their arrival. The broker's setting is put back at the end.

Needs the local stack (scripts/services.sh up) and runs `rabbitmqctl` (stop_app and
start_app): not while the test suite runs. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parents[1]
KEY = "dead_letter_worker_publisher_confirm_timeout"
PREFIX = "bench.dlx"
TTL_MS = 2000
UNBOUND_S = 5.0


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=True)
    return done.stdout


def current_interval_ms() -> int | None:
    found = re.search(
        r"\{ok,\s*(\d+)\}", rabbitmqctl("eval", f"application:get_env(rabbit, {KEY}).")
    )
    return int(found.group(1)) if found else None


def set_interval_ms(value: int) -> None:
    rabbitmqctl("eval", f"application:set_env(rabbit, {KEY}, {value}).")
    rabbitmqctl("-q", "stop_app")  # the dead-letter workers read it when they start
    rabbitmqctl("-q", "start_app")


async def one_measurement(url: str, timeout_s: float) -> float | None:
    """Seconds from publishing the copies to both arriving at the target, or None."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        target_exchange = await channel.declare_exchange(
            f"{PREFIX}.target", aio_pika.ExchangeType.DIRECT, durable=True
        )
        target = await channel.declare_queue(
            f"{PREFIX}.target.q", durable=True, arguments={"x-queue-type": "quorum"}
        )
        delay = await channel.declare_queue(
            f"{PREFIX}.delay",
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": TTL_MS,
                "x-dead-letter-exchange": target_exchange.name,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        # As the worker's retry exchange does: the copy keeps its routing key "k", and is
        # dead-lettered with it (no x-dead-letter-routing-key) to the target exchange.
        source = await channel.declare_exchange(
            f"{PREFIX}.source", aio_pika.ExchangeType.DIRECT, durable=True
        )
        await delay.bind(source, routing_key="k")
        await target.purge()
        await delay.purge()
        await target.unbind(target_exchange, routing_key="k")
        started = time.monotonic()
        for _ in range(2):
            await source.publish(
                aio_pika.Message(b"copy", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="k",
            )
        await asyncio.sleep(UNBOUND_S)  # expired meanwhile, with nowhere to go
        await target.bind(target_exchange, routing_key="k")
        while time.monotonic() - started < timeout_s:
            passive = await channel.declare_queue(target.name, passive=True)
            if passive.declaration_result.message_count >= 2:
                return round(time.monotonic() - started, 1)
            await asyncio.sleep(0.5)
        return None
    finally:
        await connection.close()


async def cleanup(url: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for queue in (f"{PREFIX}.target.q", f"{PREFIX}.delay"):
            await channel.queue_delete(queue)
        for exchange in (f"{PREFIX}.target", f"{PREFIX}.source"):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--intervals-ms", type=int, nargs="+", default=[180000, 10000])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1/")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "dead_letter_resend.json"
    )
    args = parser.parse_args()
    before = current_interval_ms()
    runs: list[dict[str, Any]] = []
    try:
        for interval in args.intervals_ms:
            set_interval_ms(interval)
            time.sleep(3)  # the queues elect their leaders again
            arrived = asyncio.run(one_measurement(args.url, interval / 1000 + 60))
            if arrived is None:
                raise SystemExit(f"interval {interval} ms: the copies never arrived")
            runs.append({"interval_ms": interval, "arrived_after_s": arrived})
            print(f"interval {interval} ms: both copies after {arrived} s", flush=True)
    finally:
        # The queues go first, while the app has been up a while; only then the restart
        # that puts the setting back. Deleting a quorum queue whose dead-letter worker is
        # still starting (just after a restart) crashed that worker here, and with it
        # RabbitMQ 3.10's rabbit_fifo_dlx_sup: every later at-least-once queue then
        # failed to start (INTERNAL_ERROR) until the next restart.
        asyncio.run(cleanup(args.url))
        if before is not None:
            set_interval_ms(before)
        time.sleep(3)
        if "<" not in rabbitmqctl("eval", "whereis(rabbit_fifo_dlx_sup)."):
            raise SystemExit(
                "RabbitMQ's dead-letter supervisor is not running: restart the app "
                "(rabbitmqctl stop_app && rabbitmqctl start_app)"
            )
    version = re.search(r"RabbitMQ version: (\S+)", rabbitmqctl("status"))
    result = {
        "benchmark": "dead_letter_resend",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "rabbitmq": version.group(1) if version else None,
        "ttl_ms": TTL_MS,
        "target_unbound_s": UNBOUND_S,
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
