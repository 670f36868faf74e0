"""`zimage-pipeline worker`: wire settings, adapters, the service and the consumer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING

from zimage_pipeline.broker import connect
from zimage_pipeline.observability import Metrics
from zimage_pipeline.service import RequestService, ServiceConfig
from zimage_pipeline.settings import Settings, WorkerSettings
from zimage_pipeline.watchdog import (
    GenerationLimits,
    GenerationWatchdog,
    arm_exit_backstop,
    exit_process,
)
from zimage_pipeline.worker import periodic
from zimage_pipeline.worker.consumer import EXIT_FATAL, Worker
from zimage_pipeline.worker.gauges import TeamQuotaGauges, watch_anchor_age
from zimage_pipeline.worker.health import HealthServer
from zimage_pipeline.worker.periodic import RESULT_SINKS_JOB, PeriodicJob

if TYPE_CHECKING:
    from zimage_pipeline.wiring import Wiring

# After a hung generation, the orderly shutdown may take the grace period for the other
# in-flight work, plus this for requeueing and closing, before the backstop exits anyway.
HANG_EXIT_MARGIN_S = 30.0

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _gpu_memory_probe(metrics: Metrics) -> None:
    import torch

    if torch.cuda.is_available():
        metrics.gpu_memory_bytes.set(torch.cuda.memory_allocated())


def _worker_jobs(
    settings: Settings, wiring: Wiring, metrics: Metrics, service: RequestService
) -> list[PeriodicJob]:
    """The worker's own periodic jobs, beside the wiring's housekeeping."""
    jobs = [
        # A junk window's count is written even when the junk stops.
        PeriodicJob("junk_summaries", 30.0, service.flush_junk_summaries, housekeeping=False),
        PeriodicJob("gpu_memory", 30.0, lambda: _gpu_memory_probe(metrics), housekeeping=False),
    ]
    if wiring.quota is not None:
        jobs.append(TeamQuotaGauges(wiring.quota, settings.policy, metrics).job())
    return jobs


RELOAD_CONFIG_JOB = "reload_config"


class _ConfigReload:
    """Reload the templates when their directory changes (and on SIGHUP) and the policy
    when its file does; a refused new version leaves the last good one in use, counted
    and shown on /readyz."""

    def __init__(self, settings: Settings, wiring: Wiring, metrics: Metrics) -> None:
        self._settings = settings
        self._wiring = wiring
        self._metrics = metrics
        self._policy_error: str | None = None  # the refusal last counted, if any
        wiring.templates.on_result = self._templates_reloaded

    def job(self) -> PeriodicJob:
        poll_s = self._settings.templates.reload_poll_s
        return PeriodicJob(RELOAD_CONFIG_JOB, poll_s, self.run, housekeeping=False)

    def run(self) -> None:
        from zimage_pipeline.policy import load_rules, policy_refused

        self._wiring.templates.poll()
        load_rules(self._settings.policy)  # re-read only when the file changed
        error = policy_refused(self._settings.policy)
        if error != self._policy_error:
            result = "ok" if error is None else "refused"
            self._metrics.config_reloads.labels("policy", result).inc()
            self._policy_error = error
        self._refused_now("policy", error is not None)

    def _templates_reloaded(self, ok: bool) -> None:
        self._metrics.config_reloads.labels("templates", "ok" if ok else "refused").inc()
        self._refused_now("templates", not ok)

    def _refused_now(self, what: str, refused: bool) -> None:
        self._metrics.config_refused.labels(what).set(1 if refused else 0)


def _config_details(settings: Settings, wiring: Wiring) -> list[str]:
    from zimage_pipeline.policy import policy_refused

    lines = []
    if wiring.templates.error is not None:
        lines.append(f"templates: new files refused, last good in use: {wiring.templates.error}")
    policy_error = policy_refused(settings.policy)
    if policy_error is not None:
        lines.append(f"policy: new file refused, last good in use: {policy_error}")
    return lines


def generation_watchdog(settings: WorkerSettings) -> GenerationWatchdog:
    """Each generation's time limit; once one overruns, the process ends within
    `shutdown_grace_s` + a margin even if the orderly shutdown gets stuck too."""
    after_s = settings.shutdown_grace_s + HANG_EXIT_MARGIN_S
    return GenerationWatchdog(
        GenerationLimits.of(settings),
        on_hang=lambda _error: arm_exit_backstop(EXIT_FATAL, after_s=after_s),
    )


async def run_worker(
    settings: Settings, wiring: Wiring, *, stop: asyncio.Event | None = None
) -> int:
    """Run until SIGTERM/SIGINT (or `stop`); exit code 0, or 70 after a fatal error.

    After a generation past its time limit this does not return: the process exits 70
    (`exit_process`), since the stuck GPU thread would hold the interpreter's exit."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reload_now = asyncio.Event()

    def on_sighup() -> None:
        wiring.templates.request_reload()
        reload_now.set()

    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    worker_id = settings.worker.worker_id or default_worker_id()
    metrics = Metrics()
    if wiring.anchorer is not None:
        watch_anchor_age(metrics, wiring.anchorer, settings.audit.anchor_interval_s)
    # One GPU thread: the engine is not re-entrant and the GPU is one device. A small
    # pool for the blocking I/O adapters (ledger, ldap3, boto3, image encoding).
    gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-gpu")
    io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="zimage-io")
    watchdog = generation_watchdog(settings.worker)
    service = RequestService(
        wiring.ports,
        ServiceConfig(
            worker_id=worker_id,
            max_body_bytes=settings.worker.max_body_bytes,
            heartbeat_s=settings.worker.job_busy_s / 4,
            max_job_attempts=settings.worker.max_job_attempts,
            plugin_timeout_s=settings.plugins.stage_timeout_s,
        ),
        gpu_executor=gpu,
        io_executor=io,
        watchdog=watchdog,
    )
    worker = Worker(
        connect=lambda: connect(settings.broker, name=f"zimage-worker {worker_id}"),
        broker=settings.broker,
        settings=settings.worker,
        service=service,
        metrics=metrics,
    )
    health: HealthServer | None = None
    if settings.worker.http_port:
        health = HealthServer(
            registry=metrics.registry,
            is_ready=lambda: worker.ready,
            host=settings.worker.http_host,
            port=settings.worker.http_port,
            problem=watchdog.problem,
            details=lambda: _config_details(settings, wiring),
        )
        await health.start()
    log.info("worker %s starting", worker_id)
    background = periodic.start(
        [
            *wiring.periodic,
            *_worker_jobs(settings, wiring, metrics, service),
            _ConfigReload(settings, wiring, metrics).job(),
        ],
        io,
        wakers={RESULT_SINKS_JOB: worker.sinks_pending, RELOAD_CONFIG_JOB: reload_now},
    )
    try:
        code = await worker.run_until(stop)
    finally:
        for task in background:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        with suppress(Exception):  # the count of a junk window still open
            await service.flush_junk_summaries(all_windows=True)
        if health is not None:
            await health.stop()
        io.shutdown(wait=False, cancel_futures=True)
        gpu.shutdown(wait=False, cancel_futures=True)
        for close in wiring.closers:
            with suppress(Exception):
                close()
    if watchdog.hung is not None:
        log.critical("worker %s stopped, %s (exit %d)", worker_id, watchdog.problem(), EXIT_FATAL)
        exit_process(EXIT_FATAL)
    log.info("worker %s stopped (exit %d)", worker_id, code)
    return code
