"""Building the results of the core: success, rejection, failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from zimage_pipeline.errors import ZImageError, client_facing
from zimage_pipeline.messages import (
    CONTROL_CHARS,
    MAX_LABELS,
    AdapterInfo,
    DirectoryId,
    GenerationRequest,
    GenerationResult,
    LabelKey,
    LabelValue,
    ModelInfo,
    QuotaRemaining,
    Status,
    StoredImage,
    StoredRendition,
)
from zimage_pipeline.ports import (
    Authorization,
    EncodedDerived,
    EncodedImage,
    ImageSpec,
    InputImage,
    ModelIdentity,
    QuotaLeft,
    RawImage,
    StoredOutputs,
)


def rejected(
    request_id: str, error: ZImageError, *, status: Status = Status.REJECTED
) -> GenerationResult:
    """The unsuccessful result for `error`, as a client may see it (`client_facing`:
    an internal error is INTERNAL_ERROR, whatever its own reason)."""
    reason, message = client_facing(error)
    return GenerationResult(
        request_id=request_id,
        status=status,
        reason=reason,
        message=message,
        finished_at=datetime.now(UTC),
    )


def succeeded_result(
    request: GenerationRequest,
    *,
    outputs: StoredOutputs,
    encoded: Sequence[EncodedImage],
    model: ModelIdentity,
    left: QuotaLeft,
    timings: dict[str, float],
    finished_at: datetime,
    derived: Sequence[EncodedDerived] = (),
) -> GenerationResult:
    renditions = _renditions_by_source(outputs, derived)
    return GenerationResult(
        request_id=request.request_id,
        status=Status.SUCCEEDED,
        on_behalf_of=request.on_behalf_of,
        images=[
            StoredImage(
                bucket=ref.bucket,
                key=ref.key,
                version_id=ref.version_id,
                sha256=ref.sha256,
                bytes=ref.size,
                width=image.width,
                height=image.height,
                format=image.format,
                seed=image.seed,
                url=ref.url,
                renditions=renditions.get(index, []),
            )
            for index, (ref, image) in enumerate(zip(outputs.images, encoded, strict=True))
        ],
        audit_record_key=outputs.audit_record_key,
        timings_s=dict(timings),
        model=ModelInfo(
            name=model.name,
            revision=model.revision,
            weights_sha256=model.weights_sha256,
            adapters=[
                AdapterInfo(name=a.name, sha256=a.sha256, weight=a.weight) for a in model.adapters
            ],
        ),
        quota_remaining=QuotaRemaining(day=left.day, month=left.month),
        labels=dict(request.labels),
        finished_at=finished_at,
    )


def _renditions_by_source(
    outputs: StoredOutputs, derived: Sequence[EncodedDerived]
) -> dict[int, list[StoredRendition]]:
    """The stored derived images, listed under the image each was made from."""
    by_source: dict[int, list[StoredRendition]] = {}
    for ref, image in zip(outputs.derived, derived, strict=True):
        by_source.setdefault(image.source_index, []).append(
            StoredRendition(
                name=image.name,
                bucket=ref.bucket,
                key=ref.key,
                version_id=ref.version_id,
                sha256=ref.sha256,
                bytes=ref.size,
                width=image.width,
                height=image.height,
                format=image.format,
                plugin=image.plugin,
                url=ref.url,
            )
        )
    return by_source


MAX_SEED = 2**63 - 1


def image_specs(
    request: GenerationRequest, base_seed: int, inputs: Sequence[InputImage] = ()
) -> list[ImageSpec]:
    """One spec per image; image n uses seed base_seed + n (recorded in the result)."""
    pixels = {image.role: image.pixels for image in inputs}
    return [
        ImageSpec(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=(base_seed + index) % (MAX_SEED + 1),
            task=request.task.value,
            init_image=pixels.get("init_image"),
            mask_image=pixels.get("mask"),
            strength=request.repaint_strength,
            adapters=tuple((a.name, a.weight or 0.0) for a in request.adapters),
        )
        for index in range(request.num_images)
    ]


def _model_dict(model: ModelIdentity) -> dict[str, Any]:
    found: dict[str, Any] = {
        "name": model.name,
        "revision": model.revision,
        "weights_sha256": model.weights_sha256,
    }
    if model.adapters:  # absent without adapters: records as before
        found["adapters"] = [
            {"name": a.name, "sha256": a.sha256, "weight": a.weight} for a in model.adapters
        ]
    return found


def generated_payload(
    request: GenerationRequest,
    model: ModelIdentity,
    images: Sequence[RawImage],
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "model": _model_dict(model),
        "seeds": [image.seed for image in images],
        "parameters": {
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
        },
        "generate_s": timings.get("generate"),
    }


def stored_payload(
    outputs: StoredOutputs, derived: Sequence[EncodedDerived] = ()
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "objects": [{"key": o.key, "sha256": o.sha256, "bytes": o.size} for o in outputs.images],
        "audit_record_key": outputs.audit_record_key,
    }
    if derived:
        payload["renditions"] = [
            {
                "key": ref.key,
                "sha256": ref.sha256,
                "bytes": ref.size,
                "source_index": image.source_index,
                "name": image.name,
                "plugin": image.plugin,
                "details": dict(image.details),
            }
            for ref, image in zip(outputs.derived, derived, strict=True)
        ]
    return payload


def template_record(request: GenerationRequest) -> dict[str, Any] | None:
    """The template a (rendered) request was made from, as the trail, the audit record
    and the image's provenance record it: id, version, the catalogue file's SHA-256
    and every slot's value. None for a free prompt."""
    if request.template is None:
        return None
    return {
        "id": request.template.id,
        "version": request.template.version,
        "sha256": request.template.sha256,
        "variables": dict(request.variables),
    }


def audit_record_of(
    request: GenerationRequest,
    *,
    payload_sha256: str,
    auth: Authorization,
    model: ModelIdentity,
    seeds: list[int],
    timings: dict[str, float],
    worker_id: str,
    attempt: int,
) -> dict[str, Any]:
    """The JSON record stored beside the images: everything compliance asks about."""
    return {
        "request": request.model_dump(mode="json", by_alias=True),
        "template": template_record(request),
        "payload_sha256": payload_sha256,
        "principal": auth.principal,
        "subject": auth.subject,
        "decision": "authorized",
        "roles_snapshot": dict(auth.roles_snapshot),
        "quota": {"reserved": request.num_images},
        "model": _model_dict(model),
        "seeds": seeds,
        "timings_s": dict(timings),
        "worker_id": worker_id,
        "attempt": attempt,
    }


_LABELS = TypeAdapter(dict[LabelKey, LabelValue])
_ON_BEHALF_OF = TypeAdapter(DirectoryId)


def readable_context(document: Mapping[str, Any] | None) -> dict[str, Any]:
    """`on_behalf_of` and `labels` of a message that is not a valid request, each when it
    is well-formed on its own: every result carries them where they were readable, so a
    CMS can file even a refusal under its asset."""
    if not document:
        return {}
    context: dict[str, Any] = {}
    with suppress(ValidationError):
        on_behalf_of = _ON_BEHALF_OF.validate_python(document.get("on_behalf_of"), strict=True)
        if not CONTROL_CHARS.search(on_behalf_of):
            context["on_behalf_of"] = on_behalf_of
    with suppress(ValidationError):
        labels = _LABELS.validate_python(document.get("labels"), strict=True)
        if len(labels) <= MAX_LABELS:
            context["labels"] = labels
    return context
