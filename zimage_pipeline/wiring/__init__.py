"""Bind the service's ports to the real adapters, from settings.

Everything slow or fallible at startup happens here, before the worker consumes: the
model loads and warms up, the policy file is read, the signing material is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from zimage_pipeline.ports import AuditRecord
from zimage_pipeline.service import Ports
from zimage_pipeline.settings import Settings
from zimage_pipeline.templates.holder import CatalogueHolder
from zimage_pipeline.worker.periodic import PeriodicJob

if TYPE_CHECKING:
    from zimage_pipeline.audit.anchoring import ChainAnchorer
    from zimage_pipeline.ledger.quota import QuotaLedger

log = logging.getLogger(__name__)


# How often the ledger and store housekeeping runs (each job on its own schedule).
HOUSEKEEPING_EVERY_S = 30.0


@dataclass(slots=True)
class Wiring:
    ports: Ports
    # The periodic jobs the worker runs (worker/periodic.py): expiring crashed workers'
    # quota leases, deleting failed requests' leftover objects, anchoring the audit chain
    # head in the object store, delivering the result sinks' outbox.
    periodic: list[PeriodicJob] = field(default_factory=list)
    closers: list[Callable[[], Any]] = field(default_factory=list)
    # The live template catalogue (reloaded by the worker's `reload_config` job).
    templates: CatalogueHolder = field(default_factory=lambda: CatalogueHolder(None))
    # What the worker's gauges read (worker/gauges.py): the anchorer's last success, and
    # the quota ledger for the teams' use (None in tests that wire fakes).
    anchorer: ChainAnchorer | None = None
    quota: QuotaLedger | None = None

    @property
    def maintenance(self) -> list[Callable[[], Any]]:
        """The housekeeping jobs' callables, for running them by hand (tests, tools)."""
        return [job.run for job in self.periodic if job.housekeeping]


class AuditAdapter:
    def __init__(self, log_: Any) -> None:
        self._log = log_

    def append(self, *, request_id: str, event_type: str, actor: str, payload: Any) -> None:
        self._log.append(request_id=request_id, event_type=event_type, actor=actor, payload=payload)

    def append_many(self, records: Sequence[AuditRecord]) -> None:
        """One transaction (one chain-lock hold, one commit) for several events."""
        self._log.append_many(records)


def build(settings: Settings, *, warmup: bool = True) -> Wiring:
    from zimage_pipeline.adapters import AdapterCatalogue, catalogue_of
    from zimage_pipeline.audit.anchoring import ChainAnchorer
    from zimage_pipeline.audit.chain import AuditLog
    from zimage_pipeline.directory import LdapDirectory
    from zimage_pipeline.engine import EngineConfig, load_engine
    from zimage_pipeline.inputs.decode import InputLimits
    from zimage_pipeline.ledger.db import create_ledger_engine
    from zimage_pipeline.ledger.discards import DiscardQueue
    from zimage_pipeline.ledger.jobs import JobStore
    from zimage_pipeline.ledger.outbox import SinkOutbox
    from zimage_pipeline.ledger.quota import QuotaLedger
    from zimage_pipeline.ledger.txn import utcnow
    from zimage_pipeline.plugins.registry import load_enabled
    from zimage_pipeline.policy import load_rules
    from zimage_pipeline.provenance import load_signing_config
    from zimage_pipeline.stages.inputs import InputSource
    from zimage_pipeline.storage import ObjectStore
    from zimage_pipeline.wiring.discards import DiscardSweeper
    from zimage_pipeline.wiring.identity import DirectoryAuthorizer
    from zimage_pipeline.wiring.jobs import TOMBSTONE, LedgerJobs
    from zimage_pipeline.wiring.ledger import LedgerUnits
    from zimage_pipeline.wiring.outputs import EngineAdapter, ProvenanceEncoder, S3Store
    from zimage_pipeline.wiring.sinks import OutboxDispatcher
    from zimage_pipeline.worker.periodic import RESULT_SINKS_JOB
    from zimage_pipeline.worker.runner import default_worker_id

    load_rules(settings.policy)  # a broken policy file stops the worker now, by name
    templates = CatalogueHolder(settings.templates.dir)  # so does a broken catalogue
    plugins = load_enabled(settings.plugins.tables())  # so does a plugin that cannot load
    ledger = create_ledger_engine(settings.database)
    directory = LdapDirectory(settings.directory)
    quota_ledger = QuotaLedger(ledger)
    object_store = ObjectStore(settings.storage)
    audit_log = AuditLog.from_settings(ledger, settings.audit)
    anchorer = ChainAnchorer(ledger, object_store, storage=settings.storage, audit=settings.audit)
    adapters = catalogue_of(settings)
    engine = load_engine(EngineConfig.from_settings(settings.engine, adapters))
    if warmup:
        # On a GPU, warm up at the default size (compiled shapes); the CPU is for tests.
        small = engine.device.type == "cpu"
        seconds = engine.warmup(width=256, height=256) if small else engine.warmup()
        log.info("engine warm in %.1fs", seconds)
    job_store = JobStore(ledger)
    discards = DiscardQueue(ledger)
    worker_id = settings.worker.worker_id or default_worker_id()
    # Result sinks (webhooks) deliver from an outbox in the ledger, never inline: a
    # receiver that is down or slow never holds a delivery or the GPU.
    outbox = SinkOutbox(ledger)
    dispatcher = (
        OutboxDispatcher(
            outbox,
            plugins.result_sinks,
            worker_id=worker_id,
            lease_s=settings.plugins.sink_lease_s,
        )
        if plugins.result_sinks
        else None
    )
    retention = timedelta(days=settings.plugins.sink_retention_days)
    ports = Ports(
        adapters=AdapterCatalogue.of(adapters, max_active=settings.engine.adapter_slots),
        jobs=LedgerJobs(job_store, busy_s=settings.worker.job_busy_s),
        authorizer=DirectoryAuthorizer(directory, settings.policy),
        ledger=LedgerUnits(
            ledger,
            jobs=job_store,
            quota=quota_ledger,
            audit=audit_log,
            discards=discards,
            lease_s=settings.policy.lease_s,
        ),
        engine=EngineAdapter(engine),
        encoder=ProvenanceEncoder(
            creator_tool=settings.provenance.creator_tool,
            c2pa=load_signing_config(settings.provenance),
        ),
        store=S3Store(
            object_store,
            prefix=settings.storage.prefix,
            presign_ttl_s=settings.storage.presign_ttl_s,
        ),
        audit=AuditAdapter(audit_log),
        plugins=plugins,
        outbox=dispatcher,
        templates=templates.current,
        inputs=InputSource(object_store, InputLimits(**settings.inputs.model_dump())),
    )
    sweeper = DiscardSweeper(
        discards, store=ports.store, ledger=ports.ledger, actor=f"worker:{worker_id}"
    )
    sink_jobs = (
        [
            # Woken by the worker as soon as it queued something (runner's wakers).
            PeriodicJob(
                RESULT_SINKS_JOB,
                settings.plugins.sink_poll_s,
                dispatcher.run_once,
                housekeeping=False,
            ),
            PeriodicJob("prune_sink_outbox", 3600.0, lambda: outbox.prune(utcnow() - retention)),
        ]
        if dispatcher is not None
        else []
    )
    closers: list[Callable[[], Any]] = [
        close for sink in plugins.result_sinks.values() if (close := getattr(sink, "close", None))
    ]
    return Wiring(
        templates=templates,
        ports=ports,
        periodic=[
            PeriodicJob("expire_quota_leases", HOUSEKEEPING_EVERY_S, quota_ledger.expire_leases),
            PeriodicJob("discard_sweep", HOUSEKEEPING_EVERY_S, sweeper.sweep),
            # maybe_anchor writes only every audit.anchor_interval_s; asked more often.
            PeriodicJob("anchor_audit_chain", HOUSEKEEPING_EVERY_S, anchorer.maybe_anchor),
            PeriodicJob(
                "forget_unanswered_cancels",
                3600.0,
                lambda: job_store.forget_cancels_older_than(
                    TOMBSTONE, utcnow() - timedelta(days=settings.worker.cancel_wait_days)
                ),
            ),
            *sink_jobs,
        ],
        closers=[*closers, directory.close, ledger.dispose],
        anchorer=anchorer,
        quota=quota_ledger,
    )
