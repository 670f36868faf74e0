"""Structured JSON logs with the job's context, and the Prometheus metrics."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_job_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "zimage_job_context", default=None
)


def bind_job(**fields: str) -> contextvars.Token[dict[str, str] | None]:
    """Attach request_id / user to every log line of the current job (asyncio task)."""
    return _job_context.set({**(_job_context.get() or {}), **fields})


def unbind_job(token: contextvars.Token[dict[str, str] | None]) -> None:
    _job_context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_job_context.get() or {})
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ContextTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in (_job_context.get() or {}).items())
        base = super().format(record)
        return f"{base} [{context}]" if context else base


def configure_logging(*, level: str, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else ContextTextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' chatter (and any URL they might print) stays below our level.
    for noisy in ("aiormq", "aio_pika", "botocore", "urllib3", "ldap3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Metrics:
    """The worker's metrics, on their own registry (one per worker process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "zimage_jobs",
            "Requests ended, by terminal status and reason (an answer republished for a "
            "duplicate or a redelivery is not counted again).",
            ["status", "reason"],
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "zimage_phase_seconds",
            "Time per request phase.",
            ["phase"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "zimage_in_flight", "Deliveries being processed.", registry=self.registry
        )
        self.buffered = Gauge(
            "zimage_buffered", "Deliveries received and waiting.", registry=self.registry
        )
        self.images = Counter(
            "zimage_images", "Images generated and stored.", registry=self.registry
        )
        self.retries = Counter(
            "zimage_retries",
            "Deliveries sent to the delayed retry path.",
            ["reason"],
            registry=self.registry,
        )
        self.gpu_memory_bytes = Gauge(
            "zimage_gpu_memory_allocated_bytes",
            "GPU memory allocated by torch.",
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "zimage_config_reloads",
            "Reloads of the templates or the policy, by result (ok, refused).",
            ["config", "result"],
            registry=self.registry,
        )
        self.config_refused = Gauge(
            "zimage_config_refused",
            "1 while the newest templates or policy files are refused (the last good "
            "version is in use), else 0.",
            ["config"],
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "zimage_queue_wait_seconds",
            "Time from a request's publication (the message's AMQP timestamp, when the "
            "publisher set one) or else its arrival at this worker, to the start of its "
            "processing, by priority.",
            ["priority"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.audit_anchor_age_seconds = Gauge(
            "zimage_audit_anchor_age_seconds",
            "Seconds since this worker last saw the audit chain head anchored in the "
            "object store (counted from its start until the first anchor).",
            registry=self.registry,
        )
        self.audit_anchor_interval_seconds = Gauge(
            "zimage_audit_anchor_interval_seconds",
            "The configured audit.anchor_interval_s (for alerts on the anchor age).",
            registry=self.registry,
        )
        self.team_quota_used_images = Gauge(
            "zimage_team_quota_used_images",
            "Images a policy team has used or holds reserved in the current UTC day or "
            "month (read from the ledger every minute, not per scrape).",
            ["team", "window"],
            registry=self.registry,
        )
        self.team_quota_limit_images = Gauge(
            "zimage_team_quota_limit_images",
            "A policy team's limit for the current day or month, with grants; absent for "
            "a window without a cap.",
            ["team", "window"],
            registry=self.registry,
        )
