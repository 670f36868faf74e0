"""The reason codes a client can see are one closed, documented list."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import zimage_pipeline
from zimage_pipeline.errors import ZImageError, client_facing
from zimage_pipeline.messages import GenerationResult, Status
from zimage_pipeline.reasons import DESCRIPTIONS, Reason, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- reasons:begin -->\n(.*?)<!-- reasons:end -->", text, re.S)
    assert block, "the README lost its reasons table markers"
    assert block.group(1) == markdown_table(), "run python -m zimage_pipeline.reasons"


def test_every_reason_is_described() -> None:
    assert set(DESCRIPTIONS) == set(Reason)


def _error_classes() -> list[type[ZImageError]]:
    for module in pkgutil.walk_packages(zimage_pipeline.__path__, "zimage_pipeline."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    found: list[type[ZImageError]] = []
    pending: list[type[ZImageError]] = [ZImageError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return found


def test_every_error_reaches_a_client_as_a_listed_reason() -> None:
    for cls in _error_classes():
        error = cls.__new__(cls)
        Exception.__init__(error, "text")
        reason, _ = client_facing(error)
        assert reason in Reason.__members__, (cls.__name__, reason)


def test_a_stored_result_with_an_unlisted_reason_loads_as_internal_error() -> None:
    stored = {
        "request_id": "r1",
        "status": Status.FAILED.value,
        "reason": "ILLEGAL_TRANSITION",
        "finished_at": "2026-03-01T00:00:00+00:00",
    }
    assert GenerationResult.model_validate(stored).reason is Reason.INTERNAL_ERROR
