"""Turn raw AMQP bodies into validated messages, or an error that names the problem.

Every failure becomes an InvalidRequestError whose text names the offending field(s),
so that the rejected result tells the client what to fix. Input values are never echoed
(a prompt may be confidential, a body may be huge).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.messages import CancelRequest, GenerationRequest

DEFAULT_MAX_BODY_BYTES = 64 * 1024

_M = TypeVar("_M", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(body)"


def describe_validation_error(exc: ValidationError) -> str:
    unknown = [_field_path(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    problems = [
        f"{_field_path(e['loc'])}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)
        if e["type"] != "extra_forbidden"
    ]
    if unknown:
        problems.insert(0, f"unknown field(s): {', '.join(sorted(unknown))}")
    return "; ".join(problems)


def _decode(body: bytes, model: type[_M], *, max_bytes: int) -> _M:
    if len(body) > max_bytes:
        raise InvalidRequestError(f"body: {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"body: not valid UTF-8 at byte {exc.start}") from exc
    try:
        # The stdlib parser first: it names the position of a syntax error, and with
        # parse_constant we refuse NaN/Infinity, which are not JSON.
        document = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidRequestError(f"body: not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise InvalidRequestError(f"body: expected a JSON object, got {type(document).__name__}")
    try:
        # Strict JSON-mode validation: types exactly as JSON gives them.
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)) from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_request(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> GenerationRequest:
    return _decode(body, GenerationRequest, max_bytes=max_bytes)


def decode_cancel(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> CancelRequest:
    return _decode(body, CancelRequest, max_bytes=max_bytes)


def peek_request_id(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> str | None:
    """Best effort: the request_id of an invalid message, if it has a valid one."""
    if len(body) > max_bytes:
        return None
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    candidate = document.get("request_id")
    if not isinstance(candidate, str):
        return None
    try:
        GenerationRequest.model_validate(
            {"request_id": candidate, "on_behalf_of": "x", "prompt": "x"}, strict=True
        )
    except ValidationError:
        return None
    return candidate
