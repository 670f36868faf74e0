"""`worker`, `submit` and `cancel`: the commands that talk to RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import typer

from zimage_pipeline.decoding import decode_request
from zimage_pipeline.errors import EXIT_CONFIG, ConfigError, InvalidRequestError
from zimage_pipeline.messages import Status
from zimage_pipeline.settings import Settings

EXIT_NOT_SUCCEEDED = 1
EXIT_INVALID = 2
EXIT_TIMEOUT = 124
EXIT_NOT_PUBLISHED = 3  # the broker took nothing: safe to retry with the same request id


def run_worker_command(settings: Settings) -> None:
    from zimage_pipeline.observability import configure_logging
    from zimage_pipeline.wiring import build
    from zimage_pipeline.worker.runner import run_worker

    configure_logging(level=settings.logging.level, json_logs=settings.logging.json_logs)

    async def main() -> int:
        try:
            wiring = await asyncio.to_thread(build, settings)
        except ConfigError as exc:
            # A configuration that cannot work (a missing policy file or model, a bad
            # template): one clear line and exit 2, which `worker --devices` and
            # operators read as "fix the configuration", not a crash to retry.
            typer.echo(f"error: {exc}", err=True)
            return EXIT_CONFIG
        return await run_worker(settings, wiring)

    raise typer.Exit(asyncio.run(main()))


def run_supervisor_command(settings: Settings, devices: str, *, config: Path | None) -> None:
    """`worker --devices 0,1`: one worker per GPU under a supervisor (worker/supervisor.py).
    The settings were loaded (and so checked) here once; each child loads them again."""
    from zimage_pipeline.observability import configure_logging
    from zimage_pipeline.worker.runner import HANG_EXIT_MARGIN_S
    from zimage_pipeline.worker.supervisor import (
        Supervisor,
        child_specs,
        parse_devices,
        worker_command,
    )

    configure_logging(level=settings.logging.level, json_logs=settings.logging.json_logs)
    try:
        specs = child_specs(
            parse_devices(devices),
            base_port=settings.worker.http_port,
            worker_id=settings.worker.worker_id,
            engine_device=settings.engine.device,
        )
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    supervisor = Supervisor(
        specs,
        worker_command(str(config) if config else None),
        # A worker drains in shutdown_grace_s; its own backstop ends it within the margin.
        grace_s=settings.worker.shutdown_grace_s + HANG_EXIT_MARGIN_S,
    )
    raise typer.Exit(asyncio.run(supervisor.run()))


def build_request_document(
    *,
    file: Path | None,
    fields: dict[str, Any],
    labels: list[str],
    username: str,
) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if file is not None:
        loaded = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise InvalidRequestError(f"{file}: expected a JSON object")
        document.update(loaded)
    document.update({k: v for k, v in fields.items() if v is not None})
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep:
            raise InvalidRequestError(f"--label {label!r}: expected KEY=VALUE")
        document.setdefault("labels", {})[key] = value
    document.setdefault("request_id", f"cli-{uuid.uuid4().hex}")
    document.setdefault("on_behalf_of", username)
    return document


def submit_command(settings: Settings, document: dict[str, Any], *, wait: bool) -> None:
    from zimage_pipeline.client import NotPublishedError, ResultTimeoutError, submit

    username = settings.client.username
    if not username:
        typer.echo("error: set client.username (ZIMAGE_CLIENT__USERNAME) to submit", err=True)
        raise typer.Exit(EXIT_INVALID)
    try:
        # Validate locally first: a clear error now instead of a rejected result later.
        request = decode_request(json.dumps(document).encode())
    except InvalidRequestError as exc:
        typer.echo(f"error: invalid request: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        result = asyncio.run(
            submit(
                request,
                broker=settings.broker,
                username=username,
                password=settings.client.resolved_password().get_secret_value(),
                wait_s=settings.client.wait_s if wait else None,
            )
        )
    except ResultTimeoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    except NotPublishedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_NOT_PUBLISHED) from None
    if result is None:
        typer.echo(json.dumps({"published": request.request_id}))
        return
    typer.echo(result.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    if result.status is not Status.SUCCEEDED:
        raise typer.Exit(EXIT_NOT_SUCCEEDED)


def cancel_command(settings: Settings, request_id: str) -> None:
    from zimage_pipeline.client import NotPublishedError, cancel

    if not settings.client.username:
        typer.echo("error: set client.username (ZIMAGE_CLIENT__USERNAME) to cancel", err=True)
        raise typer.Exit(EXIT_INVALID)
    try:
        asyncio.run(
            cancel(
                request_id,
                broker=settings.broker,
                username=settings.client.username,
                password=settings.client.resolved_password().get_secret_value(),
            )
        )
    except NotPublishedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_NOT_PUBLISHED) from None
    typer.echo(json.dumps({"cancel_published": request_id}))
