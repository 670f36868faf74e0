"""The demo's plugins: their configuration (config/demo-plugins.toml) and a webhook
receiver that checks every delivery's signature, as a CMS endpoint would."""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zimage_pipeline.plugins.webhook import verify_signature

DEMO_PLUGINS_FILE = Path("config/demo-plugins.toml")
WEBHOOK_URL_MARK = "@WEBHOOK_URL@"


def plugin_tables(webhook_url: str, *, root: Path = Path()) -> dict[str, Any]:
    """The `[plugins]` tables of the demo, with the webhook pointed at `webhook_url`."""
    text = (root / DEMO_PLUGINS_FILE).read_text(encoding="utf-8")
    tables: dict[str, Any] = tomllib.loads(text.replace(WEBHOOK_URL_MARK, webhook_url))["plugins"]
    return tables


@dataclass(frozen=True, slots=True)
class Delivery:
    request_id: str
    delivery_id: str
    attempt: int
    signed: bool  # the signature and its timestamp check out


@dataclass
class WebhookReceiver:
    """Records the POSTs it is sent; answers 204 to each."""

    secret: bytes
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, headers: Any, body: bytes) -> None:
        signed = verify_signature(
            self.secret,
            timestamp=headers.get("X-Zimage-Timestamp", ""),
            body=body,
            signature=headers.get("X-Zimage-Signature", ""),
        )
        try:
            request_id = str(json.loads(body).get("request_id", ""))
        except ValueError:
            request_id = ""
        delivery = Delivery(
            request_id,
            headers.get("X-Zimage-Delivery", ""),
            int(headers.get("X-Zimage-Attempt", "0") or 0),
            signed,
        )
        with self.lock:
            self.deliveries.append(delivery)

    def of(self, request_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.request_id == request_id]

    def wait_for(
        self, request_ids: set[str], timeout_s: float, *, poll: Callable[[], Any] | None = None
    ) -> None:
        """Until every id was delivered once or `timeout_s` passed; `poll` (the outbox's
        job, when no worker runs it) is called between looks."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.of(rid) for rid in request_ids):
                return
            if poll is not None:
                poll()
            time.sleep(0.2)


@contextmanager
def receiving(url: str, secret: bytes) -> Iterator[WebhookReceiver]:
    """A receiver listening on `url`'s host and port for the length of the block."""
    receiver = WebhookReceiver(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver.record(self.headers, body)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the demo prints its own table

    parts = urlsplit(url)
    server = ThreadingHTTPServer((parts.hostname or "127.0.0.1", parts.port or 80), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
