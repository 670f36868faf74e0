"""Admission rules of the core: a request's parameters against the subject's limits."""

from __future__ import annotations

from zimage_pipeline.errors import Disposition, RequestRejectedError, ZImageError
from zimage_pipeline.messages import GenerationRequest, Status
from zimage_pipeline.ports import Authorization


class RequestExpiredError(ZImageError):
    disposition = Disposition.FAIL
    reason = "EXPIRED"


STATUS_BY_REASON = {"EXPIRED": Status.EXPIRED, "CANCELLED": Status.CANCELLED}


def ending_status(error: ZImageError, *, running: bool) -> Status:
    """The status a request ends with for `error`. A refusal (REJECT) found once the job
    runs, e.g. parameters the engine cannot take, ends it `failed`, keeping its reason:
    the ledger's state machine has no running -> rejected (`rejected` means nothing ran),
    and asking for it raised ILLEGAL_TRANSITION, which the worker then retried."""
    refused = error.disposition is Disposition.REJECT and not running
    return STATUS_BY_REASON.get(error.reason, Status.REJECTED if refused else Status.FAILED)


def check_limits(request: GenerationRequest, auth: Authorization) -> None:
    """Enforce the subject's role limits; the message names the limit that was hit."""
    limits = auth.limits
    if not limits.generate:
        raise RequestRejectedError(
            f"{auth.subject!r} has no role that allows generating images", reason="NOT_AUTHORIZED"
        )
    problems = []
    if max(request.width, request.height) > limits.max_side:
        problems.append(f"width/height: at most {limits.max_side} px per side")
    if request.pixels > limits.max_pixels:
        problems.append(f"width*height: at most {limits.max_pixels} pixels")
    if request.num_images > limits.max_images:
        problems.append(f"num_images: at most {limits.max_images}")
    if request.steps > limits.max_steps:
        problems.append(f"steps: at most {limits.max_steps}")
    if request.format not in limits.formats:
        allowed = ", ".join(sorted(f.value for f in limits.formats))
        problems.append(f"format: one of {allowed}")
    if request.priority not in limits.priorities:
        allowed = ", ".join(sorted(p.value for p in limits.priorities))
        problems.append(f"priority: one of {allowed}")
    if problems:
        raise RequestRejectedError(
            "the request exceeds what the user's roles allow: " + "; ".join(problems),
            reason="POLICY_VIOLATION",
        )
