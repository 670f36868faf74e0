"""Admission rules of the core: a request's parameters against the subject's limits."""

from __future__ import annotations

from zimage_pipeline.errors import Disposition, RequestRejectedError, ZImageError
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.ports import Authorization


class RequestExpiredError(ZImageError):
    disposition = Disposition.FAIL
    reason = "EXPIRED"


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


def check_adapter_use(request: GenerationRequest, auth: Authorization) -> None:
    """Whether the subject's roles allow each adapter the request itself names (not the
    ones a template fixes: those come with the template). The message names the adapter."""
    allowed = auth.limits.adapters
    if "*" in allowed:
        return
    for index, adapter in enumerate(request.adapters):
        if adapter.name not in allowed:
            raise RequestRejectedError(
                f"adapters[{index}]: {auth.subject!r} may not use adapter {adapter.name!r} "
                f"(its roles allow {', '.join(sorted(allowed)) or 'no adapters'})",
                reason="NOT_AUTHORIZED",
            )


def check_template_use(
    request: GenerationRequest, template_tags: tuple[str, ...] | None, auth: Authorization
) -> None:
    """Whether the subject's roles allow what the request asks for: a free prompt (no
    template), or the template it names (`template_tags`: that template's tags). The
    message says what was not allowed."""
    limits = auth.limits
    if request.template is None:
        if not limits.free_prompt:
            raise RequestRejectedError(
                f"{auth.subject!r} may not send free prompts (no role with free_prompt = "
                "true): name a template",
                reason="NOT_AUTHORIZED",
            )
        return
    allowed = limits.templates
    names = {request.template.id, *(f"tag:{tag}" for tag in template_tags or ())}
    if "*" not in allowed and not names & allowed:
        raise RequestRejectedError(
            f"{auth.subject!r} may not use template {request.template.id!r} (its roles allow "
            f"{', '.join(sorted(allowed)) or 'no templates'})",
            reason="NOT_AUTHORIZED",
        )
