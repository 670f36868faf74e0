"""Identify: who is asking, and whether their request may be admitted. Asked once per
delivery, before the ledger is touched."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from zimage_pipeline.adapters import NO_ADAPTERS, AdapterCatalogue
from zimage_pipeline.admission import check_adapter_use, check_limits, check_template_use
from zimage_pipeline.errors import InvalidRequestError, PromptRefusedError, ZImageError
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins.api import PromptSubject
from zimage_pipeline.plugins.registry import LoadedPlugins
from zimage_pipeline.ports import Authorization, Authorizer, InputImage
from zimage_pipeline.stages.inputs import InputSource, read_inputs
from zimage_pipeline.stages.runtime import Runtime
from zimage_pipeline.templates.catalogue import Catalogue
from zimage_pipeline.templates.render import apply


@dataclass(frozen=True, slots=True)
class Identified:
    """The directory's answer: an authorization, or the error that is the request's
    outcome if it is to run."""

    outcome: Authorization | ZImageError
    seconds: float
    # The request to run: the client's, rendered from its template when it names one
    # (and the client's as sent when it is refused).
    request: GenerationRequest
    # Its input images, read and checked (image_to_image, inpaint).
    inputs: tuple[InputImage, ...] = ()
    # The admission checks' verdict on an authorized request (role limits, what the
    # plugins accept: its renditions, its prompt): the error it ends with, or None.
    refusal: ZImageError | None = None

    def admissible(self) -> bool:
        return not isinstance(self.outcome, ZImageError) and self.refusal is None

    def admitted(self) -> Authorization:
        """The authorization of a request the admission checks let through, else the
        error that is its outcome (the directory's first, then the checks')."""
        if isinstance(self.outcome, ZImageError):
            raise self.outcome
        if self.refusal is not None:
            raise self.refusal
        return self.outcome


async def identify(
    runtime: Runtime,
    authorizer: Authorizer,
    plugins: LoadedPlugins,
    catalogue: Catalogue,
    inputs: InputSource | None,
    request: GenerationRequest,
    principal: str,
    *,
    adapters: AdapterCatalogue = NO_ADAPTERS,
) -> Identified:
    """`catalogue`: the templates as this delivery sees them, taken once for it;
    `inputs`: where input images are read from (None: nowhere); `adapters`: the LoRA
    adapters a request may name."""
    identified = await _authorize(runtime, authorizer, request, principal)
    return await _screen(runtime, plugins, catalogue, inputs, identified, adapters)


async def _authorize(
    runtime: Runtime, authorizer: Authorizer, request: GenerationRequest, principal: str
) -> Identified:
    started = time.perf_counter()
    try:
        outcome: Authorization | ZImageError = await runtime.io(
            authorizer.authorize, principal=principal, on_behalf_of=request.on_behalf_of
        )
    except ZImageError as exc:
        outcome = exc
    return Identified(outcome, round(time.perf_counter() - started, 6), request)


def _refuse_unmade_renditions(request: GenerationRequest) -> None:
    """Renditions (and a focal point for their crops) asked of a worker where no
    post-processor reads a request's options (the renditions plugin, or another with
    `validate_request`) would silently not be made: a clear refusal instead, free."""
    if not (request.renditions or request.focal_point):
        return
    field = "renditions" if request.renditions else "focal_point"
    raise InvalidRequestError(
        f"{field}: this worker makes no renditions (the renditions plugin is not enabled)"
    )


async def _screen(
    runtime: Runtime,
    plugins: LoadedPlugins,
    catalogue: Catalogue,
    source: InputSource | None,
    identified: Identified,
    adapters: AdapterCatalogue = NO_ADAPTERS,
) -> Identified:
    """The admission checks of an authorized request: the template or free prompt its
    roles allow, the template rendered (INVALID_REQUEST naming a slot), the rendered
    request's role limits, then what each plugin must accept (a post-processor's request
    options, a prompt filter's verdict on the rendered prompt). A refusal is recorded as
    the request's outcome; nothing is reserved for it."""
    if isinstance(identified.outcome, ZImageError):
        return identified
    auth = identified.outcome
    request = identified.request
    try:
        entry = catalogue.resolve(request.template) if request.template else None
        check_template_use(request, entry.template.tags if entry else None, auth)
        if entry is None or not entry.template.adapters:
            check_adapter_use(request, auth)
        if entry is not None:
            request = apply(entry, request)
        # Adapters by catalogue name only: an unknown one is INVALID_REQUEST, free.
        request = adapters.resolve(request)
        request, inputs = await read_inputs(runtime, source, request, auth.input_grants)
        check_limits(request, auth)
        validators = [
            (name, validate)
            for name, processor in plugins.postprocessors
            if (validate := getattr(processor, "validate_request", None)) is not None
        ]
        if not validators:
            _refuse_unmade_renditions(request)
        for name, validate in validators:
            await runtime.plugin_call(name, "postprocessor", validate, request)
        who = PromptSubject(auth.subject, auth.principal, auth.roles)
        for name, prompt_filter in plugins.prompt_filters:
            refusal = await runtime.plugin_call(
                name, "prompt_filter", prompt_filter.check, request, who
            )
            if refusal is not None:
                raise PromptRefusedError(refusal.message, plugin=name, rule_id=refusal.rule_id)
    except ZImageError as exc:
        return replace(identified, refusal=exc)
    return replace(identified, request=request, inputs=inputs)
