"""Render: a request that names a template becomes the request that runs.

Plain substitution of `{slot}` by the slot's checked value, in one pass (a value that
looks like `{other}` stays text), never a template language: nothing in a template or
a value can reach attributes or run anything. Every problem is INVALID_REQUEST naming
the slot or field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from zimage_pipeline.decoding import describe_validation_error
from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.messages import MAX_PROMPT_CHARS, GenerationRequest, TemplateRef
from zimage_pipeline.templates.catalogue import Catalogue, Entry
from zimage_pipeline.templates.model import PROMPT_SLOT, SLOT, Slot, Template


def render_request(catalogue: Catalogue, request: GenerationRequest) -> GenerationRequest:
    """`request` as it runs: unchanged without a template; otherwise with the rendered
    prompts, the template's defaults for what it left unset, and the template reference
    resolved (version and the file's sha256) with every slot's value used."""
    if request.template is None:
        return request
    entry = catalogue.resolve(request.template)
    return apply(entry, request)


def apply(entry: Entry, request: GenerationRequest) -> GenerationRequest:
    template = entry.template
    values = slot_values(template, request.variables)
    if template.takes_prompt:
        if not request.prompt:
            raise InvalidRequestError(
                f"prompt: required by template {template.id!r} (it fills its {{prompt}})"
            )
        if len(request.prompt) > template.prompt_max_length:
            raise InvalidRequestError(
                f"prompt: template {template.id!r} takes at most "
                f"{template.prompt_max_length} characters of free prompt"
            )
        values[PROMPT_SLOT] = request.prompt
    elif request.prompt:
        raise InvalidRequestError(f"prompt: template {template.id!r} takes no free prompt")
    update: dict[str, Any] = {"prompt": substitute(template.prompt, values, "prompt")}
    if template.negative_prompt is not None:
        if request.negative_prompt is not None:
            raise InvalidRequestError(
                f"negative_prompt: template {template.id!r} has its own negative prompt"
            )
        update["negative_prompt"] = substitute(template.negative_prompt, values, "negative_prompt")
    update.update(_parameters(template, request))
    update["labels"] = {**template.labels, **request.labels}
    update["renditions"] = list(dict.fromkeys([*template.renditions, *request.renditions]))
    if template.adapters:
        if request.adapters and list(request.adapters) != list(template.adapters):
            raise InvalidRequestError(f"adapters: template {template.id!r} fixes its own adapters")
        update["adapters"] = list(template.adapters)
    update["variables"] = {k: v for k, v in values.items() if k != PROMPT_SLOT}
    update["template"] = TemplateRef(id=template.id, version=template.version, sha256=entry.sha256)
    return _checked(template, request.model_copy(update=update))


def _checked(template: Template, rendered: GenerationRequest) -> GenerationRequest:
    """The rendered request through the contract's own checks again: what the template
    adds to what the request sent (labels, renditions) must still fit its limits."""
    try:
        return GenerationRequest.model_validate_json(
            rendered.model_dump_json(by_alias=True, exclude_none=True)
        )
    except ValidationError as exc:
        raise InvalidRequestError(
            f"with template {template.id!r}: {describe_validation_error(exc)}"
        ) from None


def slot_values(template: Template, variables: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(variables) - set(template.slots))
    if unknown:
        slots = ", ".join(sorted(template.slots)) or "none"
        raise InvalidRequestError(
            f"variables.{unknown[0]}: template {template.id!r} has no such slot (slots: {slots})"
        )
    values = {}
    for name, slot in sorted(template.slots.items()):
        value = variables.get(name, slot.default)
        if value is None:
            raise InvalidRequestError(f"variables.{name}: required by template {template.id!r}")
        values[name] = check_value(name, slot, value)
    return values


def check_value(name: str, slot: Slot, value: str) -> str:
    problem = slot.problem_with(value)
    if problem is not None:
        raise InvalidRequestError(f"variables.{name}: {problem}")
    return value


def substitute(pattern: str, values: dict[str, str], field: str) -> str:
    text = SLOT.sub(lambda match: values.get(match[1], match[0]), pattern)
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"{field}: the rendered text is over {MAX_PROMPT_CHARS} characters"
        )
    return text


def _parameters(template: Template, request: GenerationRequest) -> dict[str, Any]:
    """The template's size, format, steps and seed for what the request leaves unset;
    what it sets must be what the template allows."""
    given = request.model_fields_set
    update: dict[str, Any] = {}
    sizes = template.size_pairs()
    if sizes:
        if given & {"width", "height"}:
            if (request.width, request.height) not in sizes:
                raise InvalidRequestError(
                    f"width/height: template {template.id!r} allows {', '.join(template.sizes)}"
                )
        else:
            update["width"], update["height"] = sizes[0]
    for name in ("format", "steps"):
        fixed = getattr(template, name)
        if fixed is None:
            continue
        if name in given and getattr(request, name) != fixed:
            shown = getattr(fixed, "value", fixed)
            raise InvalidRequestError(f"{name}: template {template.id!r} uses {shown}")
        update[name] = fixed
    if template.seed == "fixed":
        if request.seed is not None and request.seed != template.fixed_seed:
            raise InvalidRequestError(f"seed: template {template.id!r} uses a fixed seed")
        update["seed"] = template.fixed_seed
    return update
