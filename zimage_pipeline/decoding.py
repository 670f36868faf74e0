"""Turn raw AMQP bodies into validated messages, or an error that names the problem.

Every failure becomes an InvalidRequestError whose text names the offending field(s),
so that the rejected result tells the client what to fix. Input values are never echoed
(a prompt may be confidential, a body may be huge).
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.messages import CancelRequest, GenerationRequest

DEFAULT_MAX_BODY_BYTES = 64 * 1024
# A request nests two levels (the body, `labels`); the limit leaves room for contract
# growth and stays far below the parsers' recursion limits.
MAX_NESTING_DEPTH = 16
# One pass, linear time: a string literal (its closing quote optional, so an unterminated
# one ends the scan instead of being retried from every later quote) or a bracket.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"?|([\[\]{}])')

_M = TypeVar("_M", bound=BaseModel)


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in a JSON text (0 for a scalar), counted
    without parsing, in one linear scan that skips string literals.
    Malformed text gets some number; the parser then names its real problem."""
    depth = deepest = 0
    for bracket in _STRING_OR_BRACKET.findall(text):
        if bracket in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif bracket:
            depth -= 1
    return deepest


def _parse_object(body: bytes, *, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, within the size and nesting limits, else an error that
    names the problem. Nesting is checked before parsing: a valid body of thousands of
    nested arrays makes the recursive parsers raise RecursionError, not a clear answer."""
    if len(body) > max_bytes:
        raise InvalidRequestError(f"body: {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"body: not valid UTF-8 at byte {exc.start}") from exc
    depth = nesting_depth(text)
    if depth > MAX_NESTING_DEPTH:
        raise InvalidRequestError(
            f"body: JSON nested {depth} levels deep, more than the limit of {MAX_NESTING_DEPTH}"
        )
    try:
        # The stdlib parser first: it names the position of a syntax error, and with
        # parse_constant we refuse NaN/Infinity, which are not JSON.
        document = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int)
    except ValueError as exc:
        raise InvalidRequestError(f"body: not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise InvalidRequestError(f"body: expected a JSON object, got {type(document).__name__}")
    # Only a \uD800..\uDFFF escape can put a surrogate in a string (UTF-8 cannot carry
    # one): the walk runs only for a body that has such an escape, not on every request.
    where = _lone_surrogate(document, ()) if _SURROGATE_ESCAPE.search(text) else None
    if where is not None:
        # JSON allows "\ud800" escapes that encode no character; the model's parser
        # would refuse them with a message about hex escapes that names no field.
        raise InvalidRequestError(f"{_field_path(where)}: a lone surrogate escape is not text")
    return document


def _lone_surrogate(value: Any, path: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """The path of the first key or string holding a UTF-16 surrogate, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items: list[tuple[int | str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                return (*path, key.encode("utf-8", "backslashreplace").decode())
            items.append((key, item))
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        found = _lone_surrogate(item, (*path, key))
        if found is not None:
            return found
    return None


def read_json_object(
    body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> dict[str, Any] | None:
    """Best effort, never raising: the body as a JSON object within the limits, or None."""
    try:
        return _parse_object(body, max_bytes=max_bytes)
    except (InvalidRequestError, RecursionError):
        return None


def _decode(body: bytes, model: type[_M], *, max_bytes: int) -> _M:
    _parse_object(body, max_bytes=max_bytes)
    text = body.decode("utf-8")
    try:
        # Strict JSON-mode validation: types exactly as JSON gives them.
        # By alias only: `schema_` is the Python name of `schema`, not a second spelling.
        return model.model_validate_json(text, strict=True, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)) from exc


# No field takes an integer longer than a seed (2**63 - 1: 19 digits); checked before
# conversion, so a 5,000-digit number is refused by its length, not by the interpreter's
# int-size guard (whose message names a server setting).
MAX_INTEGER_DIGITS = 20


def _bounded_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer of {digits} digits; at most {MAX_INTEGER_DIGITS}")
    return int(literal)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_request(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> GenerationRequest:
    return _decode(body, GenerationRequest, max_bytes=max_bytes)


def decode_cancel(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> CancelRequest:
    return _decode(body, CancelRequest, max_bytes=max_bytes)


def peek_request_id(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> str | None:
    """Best effort: the request_id of an invalid message, if it has a valid one."""
    document = read_json_object(body, max_bytes=max_bytes)
    if document is None:
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
