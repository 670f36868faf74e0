"""Health, readiness and Prometheus metrics over HTTP, for Kubernetes probes.

A deliberately tiny asyncio HTTP/1.0 server: three GET routes, no dependency beyond
prometheus_client. /healthz answers while the event loop runs (a blocked loop fails the
probe) and the process has no `problem` (a hung GPU: 503 naming it); /readyz only while
the worker is consuming.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        is_ready: Callable[[], bool],
        host: str,
        port: int,
        problem: Callable[[], str | None] = lambda: None,
        details: Callable[[], list[str]] = list,
    ) -> None:
        self._registry = registry
        self._is_ready = is_ready
        # What makes the process unusable though its loop runs (None: nothing): the
        # liveness probe must fail then, so that the supervisor restarts it.
        self._problem = problem
        # Lines /readyz adds to its answer: what an operator should know but that does
        # not make the worker unready (a refused config reload: the last good one runs).
        self._details = details
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            method, _, rest = request_line.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0]
            status, content_type, body = self._route(method, path)
            head = (
                f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            problem = self._problem()
            if problem is not None:
                return 503, "text/plain", f"unhealthy: {problem}\n".encode()
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            notes = "".join(f"{line}\n" for line in self._details())
            if self._is_ready():
                return 200, "text/plain", f"ready\n{notes}".encode()
            return 503, "text/plain", f"not ready\n{notes}".encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "text/plain", b"not found\n"
