"""AMQP connections from settings (credentials passed separately, never in a URL)."""

from __future__ import annotations

import ssl
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from zimage_pipeline.settings import BrokerSettings


def ssl_context_for(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.ca_cert_file) if settings.ca_cert_file else None
    )
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _connection_options(
    settings: BrokerSettings, *, login: str | None, password: str | None, name: str
) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "login": login or settings.username,
        "password": password
        if password is not None
        else settings.resolved_password().get_secret_value(),
        "virtualhost": settings.virtual_host,
        "ssl": settings.tls,
        "ssl_context": ssl_context_for(settings),
        "timeout": settings.connect_timeout_s,
        "client_properties": {"connection_name": name},
        "heartbeat": settings.heartbeat_s,
    }


async def connect_robust(
    settings: BrokerSettings,
    *,
    login: str | None = None,
    password: str | None = None,
    name: str = "zimage-pipeline",
) -> AbstractRobustConnection:
    """A connection that reconnects by itself (clients: submit, cancel, the demo)."""
    connection: AbstractRobustConnection = await aio_pika.connect_robust(
        **_connection_options(settings, login=login, password=password, name=name)
    )
    return connection


async def connect(settings: BrokerSettings, *, name: str = "zimage-worker") -> AbstractConnection:
    """A plain connection: the worker itself notices its loss and reconnects."""
    connection: AbstractConnection = await aio_pika.connect(
        **_connection_options(settings, login=None, password=None, name=name)
    )
    return connection
