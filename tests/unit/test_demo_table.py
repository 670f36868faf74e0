"""The demo's comparison of outcomes with the expected table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zimage_pipeline.demo import build_plan
from zimage_pipeline.demo_table import MISSING, Outcome, expected_outcomes, print_table


def _result(
    status: str,
    reason: str | None = None,
    keys: tuple[str, ...] = (),
    renditions: tuple[str, ...] = ("thumb",),
) -> dict[str, Any]:
    images = [{"key": k, "renditions": [{"name": n} for n in renditions]} for k in keys]
    return {"status": status, "reason": reason, "images": images}


def _rows(bob_ok: int, bob_denied: int, *, dlq: bool = True, signed: bool = True) -> list[Outcome]:
    hero = _result("succeeded", keys=("k/0.webp",), renditions=("thumb", "social"))
    rows = [Outcome.of("hero", "cms-publisher", "r-hero", hero)]
    rows += [
        Outcome.of("bob batch", "bob", f"r-bob-{n}", _result("succeeded", keys=(f"b/{n}.png",)))
        for n in range(bob_ok)
    ]
    rows += [
        Outcome.of("bob batch", "bob", f"r-bobx-{n}", _result("rejected", "QUOTA_EXCEEDED"))
        for n in range(bob_denied)
    ]
    rows.append(Outcome.of("carol", "carol", "r-carol", _result("rejected", "NOT_AUTHORIZED")))
    refused = _result("rejected", "PROMPT_REFUSED")
    rows.append(Outcome.of("refused prompt", "cms-publisher", "r-refused", refused))
    preset = _result("succeeded", keys=("p/0.webp",), renditions=("thumb",))
    rows.append(Outcome.of("preset", "cms-publisher", "r-preset", preset))
    free = _result("rejected", "NOT_AUTHORIZED")
    rows.append(Outcome.of("free prompt", "cms-publisher", "r-free", free))
    background = _result("succeeded", keys=("g/0.png",), renditions=("thumb",))
    rows.append(Outcome.of("background", "cms-publisher", "r-background", background))
    named = [r.request_id for r in rows]
    rows += [Outcome.webhook(rid, 1, signed) for rid in named]
    rows.append(
        Outcome.of(
            "malformed", "pim-sync", "r-bad", _result("rejected", "INVALID_REQUEST"), dlq=dlq
        )
    )
    return rows


def test_matching_outcomes_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_table(_rows(3, 2), expected_outcomes(bob_allowed=3, bob_batch=5)) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "b/2.png" in out


@pytest.mark.parametrize(
    "rows",
    [
        _rows(4, 1),  # the quota let one too many through
        _rows(3, 2, dlq=False),  # the malformed message was not dead-lettered
        _rows(3, 1),  # an outcome is missing
        _rows(3, 2, signed=False),  # a webhook delivery's signature did not check out
    ],
)
def test_any_difference_fails(rows: list[Outcome], capsys: pytest.CaptureFixture[str]) -> None:
    assert print_table(rows, expected_outcomes(bob_allowed=3, bob_batch=5)) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_a_timeout_and_a_success_without_images_are_differences() -> None:
    missing = Outcome.of("hero", "cms-publisher", "r-hero", None)
    empty = Outcome.of("hero", "cms-publisher", "r-hero", _result("succeeded"))
    assert missing.status == MISSING
    assert missing.key() != ("hero", "succeeded", "")
    assert empty.key() == ("hero", "succeeded, no images", "")


def test_the_plan_has_unique_ids_under_the_run_and_one_malformed_message() -> None:
    photo = {"bucket": "zimage-inputs", "key": "cms/run-1/packshot.png", "sha256": "a" * 64}
    mask = {**photo, "key": "cms/run-1/packshot-mask.png"}
    plan = build_plan("run-1", bob_batch=5, packshot=(photo, mask))
    ids = [rid for _, _, rid, _ in plan.publications]
    # hero, batch, carol, refused, junk, preset, free prompt, background
    assert len(set(ids)) == len(ids) == 1 + 5 + 1 + 1 + 1 + 1 + 1 + 1
    (background,) = [json.loads(b) for kind, _, _, b in plan.publications if kind == "background"]
    assert (background["task"], background["init_image"], background["mask_image"]) == (
        "inpaint",
        photo,
        mask,
    )
    assert all(rid.startswith("run-1-") for rid in ids)
    assert [body for kind, _, _, body in plan.publications if kind == "malformed"] == [
        b"<sku>not json</sku>"
    ]
