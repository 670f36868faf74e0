"""Bind the service's ports to the real adapters, from settings.

Everything slow or fallible at startup happens here, before the worker consumes: the
model loads and warms up, the policy file is read, the signing material is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zimage_pipeline.ports import AuditRecord
from zimage_pipeline.service import Ports
from zimage_pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Wiring:
    ports: Ports
    # Housekeeping the worker runs periodically on its I/O pool: expiring crashed
    # workers' quota leases, deleting failed requests' leftover objects, anchoring the
    # audit chain head in the object store.
    maintenance: list[Callable[[], Any]] = field(default_factory=list)
    closers: list[Callable[[], Any]] = field(default_factory=list)


class AuditAdapter:
    def __init__(self, log_: Any) -> None:
        self._log = log_

    def append(self, *, request_id: str, event_type: str, actor: str, payload: Any) -> None:
        self._log.append(request_id=request_id, event_type=event_type, actor=actor, payload=payload)

    def append_many(self, records: Sequence[AuditRecord]) -> None:
        """One transaction (one chain-lock hold, one commit) for several events."""
        self._log.append_many(records)


def build(settings: Settings, *, warmup: bool = True) -> Wiring:
    from zimage_pipeline.audit.anchoring import ChainAnchorer
    from zimage_pipeline.audit.chain import AuditLog
    from zimage_pipeline.directory import LdapDirectory
    from zimage_pipeline.engine import EngineConfig, load_engine
    from zimage_pipeline.ledger.db import create_ledger_engine
    from zimage_pipeline.ledger.discards import DiscardQueue
    from zimage_pipeline.ledger.jobs import JobStore
    from zimage_pipeline.ledger.quota import QuotaLedger
    from zimage_pipeline.policy import load_rules
    from zimage_pipeline.provenance import load_signing_config
    from zimage_pipeline.storage import ObjectStore
    from zimage_pipeline.wiring.discards import DiscardSweeper
    from zimage_pipeline.wiring.identity import DirectoryAuthorizer
    from zimage_pipeline.wiring.jobs import LedgerJobs
    from zimage_pipeline.wiring.ledger import LedgerUnits
    from zimage_pipeline.wiring.outputs import EngineAdapter, ProvenanceEncoder, S3Store
    from zimage_pipeline.worker.runner import default_worker_id

    load_rules(settings.policy)  # a broken policy file stops the worker now, by name
    ledger = create_ledger_engine(settings.database)
    directory = LdapDirectory(settings.directory)
    quota_ledger = QuotaLedger(ledger)
    object_store = ObjectStore(settings.storage)
    audit_log = AuditLog.from_settings(ledger, settings.audit)
    anchorer = ChainAnchorer(ledger, object_store, storage=settings.storage, audit=settings.audit)
    engine = load_engine(EngineConfig.from_settings(settings.engine))
    if warmup:
        # On a GPU, warm up at the default size (compiled shapes); the CPU is for tests.
        small = engine.device.type == "cpu"
        seconds = engine.warmup(width=256, height=256) if small else engine.warmup()
        log.info("engine warm in %.1fs", seconds)
    job_store = JobStore(ledger)
    discards = DiscardQueue(ledger)
    ports = Ports(
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
    )
    sweeper = DiscardSweeper(
        discards,
        store=ports.store,
        ledger=ports.ledger,
        actor=f"worker:{settings.worker.worker_id or default_worker_id()}",
    )
    return Wiring(
        ports=ports,
        maintenance=[quota_ledger.expire_leases, sweeper.sweep, anchorer.maybe_anchor],
        closers=[directory.close, ledger.dispose],
    )
