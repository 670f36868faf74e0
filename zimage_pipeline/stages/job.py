"""A request being answered, and the audit payloads every stage records about it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from zimage_pipeline.errors import ZImageError
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.ports import AuditRecord, Authorization, InputImage
from zimage_pipeline.results import MAX_SEED, template_record


@dataclass(slots=True)
class Job:
    request: GenerationRequest
    principal: str
    payload_sha256: str
    attempt: int
    created_at: datetime
    timings: dict[str, float] = field(default_factory=dict)
    reserved: bool = False
    # The upload began: a failure from here on may leave objects that must be deleted.
    store_started: bool = False
    pending_audit: list[AuditRecord] = field(default_factory=list)
    # Its input images (image_to_image, inpaint), read and checked by identify.
    inputs: tuple[InputImage, ...] = ()

    def record(self, event_type: str, payload: Mapping[str, Any]) -> None:
        """Buffer an audit event; the driver writes them a few at a time, inside its
        ledger transactions: every audit append takes the chain's single lock and a
        commit, which made it the control plane's largest cost when each event was its
        own transaction (bench/NOTES.md)."""
        self.pending_audit.append(
            AuditRecord(self.request.request_id, event_type, self.principal, payload)
        )


def payload_digest(request: GenerationRequest) -> str:
    canonical = json.dumps(
        request.model_dump(mode="json", by_alias=True), sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def effective_seed(request: GenerationRequest, payload_sha256: str) -> int:
    """The client's seed, or one derived from the request: recorded in the result and
    the same on every retry, so a retried generation reproduces the same images."""
    if request.seed is not None:
        return request.seed
    digest = hashlib.sha256(f"seed:{request.request_id}:{payload_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def received_payload(job: Job) -> dict[str, Any]:
    # Keys the audit index understands (user, principal, labels, prompt, ...); the
    # prompt retention policy (keep / hash only / redact after N days) applies there.
    request = job.request
    payload = {
        "user": request.on_behalf_of,
        "principal": job.principal,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "labels": dict(request.labels),
        "parameters": request.model_dump(
            mode="json",
            exclude={"prompt", "negative_prompt", "labels", "template", "variables"},
            by_alias=True,
        ),
        "payload_sha256": job.payload_sha256,
        "attempt": job.attempt,
    }
    template = template_record(request)
    if template is not None:  # indexed: `audit query --template ID`
        payload["template"] = template
    return payload


def authorized_payload(auth: Authorization) -> dict[str, Any]:
    return {
        "user": auth.subject,
        "principal": auth.principal,
        "groups": list(auth.groups),
        "roles": dict(auth.roles_snapshot),
    }


def quota_reserved(job: Job) -> AuditRecord:
    request = job.request
    return AuditRecord(
        request.request_id, "quota_reserved", job.principal, {"images": request.num_images}
    )


def ending_payload(request: GenerationRequest, error: ZImageError, reason: str) -> dict[str, Any]:
    payload = {"user": request.on_behalf_of, "reason": reason, "message": str(error)}
    payload.update(error.audit_details())
    if reason != error.reason:
        payload["internal_reason"] = error.reason
    return payload
