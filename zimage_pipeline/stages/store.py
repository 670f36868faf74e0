"""Store: the images, their derived images and the audit record, uploaded through the
Store port; and the discard of what a failed upload left."""

from __future__ import annotations

import logging

from zimage_pipeline.errors import ZImageError
from zimage_pipeline.ports import (
    Authorization,
    EncodedDerived,
    EncodedImage,
    Ledger,
    ModelIdentity,
    Store,
    StoredOutputs,
)
from zimage_pipeline.results import audit_record_of
from zimage_pipeline.stages.job import Job
from zimage_pipeline.stages.runtime import Runtime

log = logging.getLogger(__name__)


async def upload(
    runtime: Runtime,
    store: Store,
    job: Job,
    *,
    auth: Authorization,
    model: ModelIdentity,
    encoded: list[EncodedImage],
    derived: list[EncodedDerived],
    worker_id: str,
) -> StoredOutputs:
    request = job.request
    audit_record = audit_record_of(
        request,
        payload_sha256=job.payload_sha256,
        auth=auth,
        model=model,
        seeds=[i.seed for i in encoded],
        timings=job.timings,
        worker_id=worker_id,
        attempt=job.attempt,
    )
    job.store_started = True
    return await runtime.io(
        store.store,
        request=request,
        created_at=job.created_at,
        images=encoded,
        audit_record=audit_record,
        first_attempt=job.attempt == 1,
        derived=derived,
    )


async def discard_outputs(
    runtime: Runtime, store: Store, ledger: Ledger, job: Job, *, worker_id: str
) -> None:
    """Delete what the failed upload left, now if the store answers; otherwise the
    ledger keeps the discard queued and the maintenance sweep retries it. Failing here
    must not change the request's outcome, which is already committed."""
    request_id = job.request.request_id
    try:
        keys = await runtime.io(store.discard, request_id=request_id, created_at=job.created_at)
        await runtime.io(
            ledger.outputs_discarded, request_id, keys=keys, actor=f"worker:{worker_id}"
        )
    except ZImageError as exc:
        log.warning("objects of %s left for the maintenance sweep: %s", request_id, exc)
