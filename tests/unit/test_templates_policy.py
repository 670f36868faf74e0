"""Templates through the service: roles decide (free prompts, which templates), a refusal
charges nothing and names what was not allowed, and the trail records the template."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.fakes import GENEROUS, FakeAuthorizer
from tests.unit.test_service import make
from zimage_pipeline.decoding import decode_request
from zimage_pipeline.messages import Status, TemplateRef
from zimage_pipeline.stages.job import payload_digest
from zimage_pipeline.templates.catalogue import Catalogue, load_catalogue

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "templates"
MARKETING = replace(GENEROUS, templates=frozenset({"tag:marketing"}), free_prompt=False)
INTERN = replace(GENEROUS, templates=frozenset({"social-teaser"}))


def body(request_id: str, **fields: Any) -> bytes:
    return json.dumps({"request_id": request_id, "on_behalf_of": "mia", **fields}).encode()


def hero(request_id: str = "t1", **fields: Any) -> bytes:
    return body(
        request_id,
        template={"id": "ecommerce-hero"},
        variables={"product": "Blue ceramic teapot"},
        **fields,
    )


def service_for(limits: Any, catalogue: Catalogue | None = None) -> Any:
    shipped = catalogue or load_catalogue(SHIPPED)
    return make(
        authorizer=FakeAuthorizer(users={"mia": limits}),
        templates=lambda: shipped,
    )


async def test_marketing_uses_a_preset_and_the_trail_records_it() -> None:
    service, ports = service_for(MARKETING)
    result = (await service.handle(hero(), principal="mia")).result
    assert result.status is Status.SUCCEEDED, result.message
    assert (result.images[0].width, result.images[0].height) == (1024, 1024)
    assert result.labels == {"preset": "ecommerce-hero"}
    received = ports.audit.payloads("t1", "received")
    template = received[0]["template"]
    assert (template["id"], template["version"]) == ("ecommerce-hero", 1)
    assert template["variables"] == {"product": "Blue ceramic teapot", "angle": "three-quarter"}
    assert len(template["sha256"]) == 64
    prompt = ports.engine.calls[0][0].prompt
    assert prompt.startswith("Studio product photograph of Blue ceramic teapot, three-quarter")


async def test_a_free_prompt_from_marketing_is_not_authorized_and_costs_nothing() -> None:
    service, ports = service_for(MARKETING)
    result = (await service.handle(body("t2", prompt="a cat"), principal="mia")).result
    assert (result.status, result.reason) == (Status.REJECTED, "NOT_AUTHORIZED")
    assert result.message is not None and "free prompts" in result.message
    assert not ports.ledger.quota.committed and not ports.engine.calls


async def test_a_template_outside_the_roles_is_not_authorized_naming_it() -> None:
    service, ports = service_for(INTERN)
    result = (await service.handle(hero("t3"), principal="mia")).result
    assert (result.status, result.reason) == (Status.REJECTED, "NOT_AUTHORIZED")
    assert result.message is not None and "'ecommerce-hero'" in result.message
    assert not ports.engine.calls


async def test_a_bad_slot_is_rejected_naming_it_and_audited() -> None:
    service, ports = service_for(MARKETING)
    bad = body("t4", template={"id": "social-teaser"}, variables={"subject": "x", "colour": "red"})
    result = (await service.handle(bad, principal="mia")).result
    assert (result.status, result.reason) == (Status.REJECTED, "INVALID_REQUEST")
    assert result.message is not None and result.message.startswith("variables.colour:")
    assert "denied" in [e for r, e in ports.audit.events if r == "t4"]
    assert not ports.ledger.quota.committed


async def test_a_redelivery_is_the_same_request_after_the_catalogue_changed(
    tmp_path: Path,
) -> None:
    """The job's digest is of what the client sent, so a redelivery of a finished request
    republishes its result even though its template has a new version by then."""
    holder: list[Catalogue] = [load_catalogue(SHIPPED)]
    service, ports = make(
        authorizer=FakeAuthorizer(users={"mia": MARKETING}), templates=lambda: holder[0]
    )
    first = await service.handle(hero("t5"), principal="mia")
    (tmp_path / "hero.toml").write_text(
        (SHIPPED / "ecommerce-hero.toml").read_text().replace("version = 1", "version = 2")
    )
    holder[0] = load_catalogue(tmp_path)
    again = await service.handle(hero("t5"), principal="mia")
    assert again.republished and again.result == first.result
    assert len(ports.engine.calls) == 1


def two_versions(tmp_path: Path, *, keep_first: bool) -> Catalogue:
    """The shipped hero template at version 1 (unless dropped) and a version 2 that
    writes another prompt."""
    shipped = (SHIPPED / "ecommerce-hero.toml").read_text()
    if keep_first:
        (tmp_path / "hero-v1.toml").write_text(shipped)
    second = shipped.replace("version = 1", "version = 2")
    second = second.replace("Studio product photograph", "Catalogue photograph")
    (tmp_path / "hero-v2.toml").write_text(second)
    return load_catalogue(tmp_path)


def admitted_then_died(ports: Any, catalogue: Catalogue, request_id: str) -> None:
    """An attempt admitted under version 1 of the hero template whose worker died: the
    ledger holds the job running, its reservation and the template it was rendered from."""
    request = decode_request(hero(request_id))
    ports.jobs.begin(
        request_id=request_id,
        payload_sha256=payload_digest(request),
        principal="mia",
        on_behalf_of="mia",
        worker_id="w-dead",
    )
    first = catalogue.resolve(TemplateRef(id="ecommerce-hero", version=1))
    ports.ledger.admit(
        request_id=request_id,
        authorization=ports.authorizer.authorize(principal="mia", on_behalf_of="mia"),
        images=1,
        audit=[],
        template=TemplateRef(id="ecommerce-hero", version=1, sha256=first.sha256),
    )


async def test_a_takeover_finishes_under_the_template_version_it_was_admitted_with(
    tmp_path: Path,
) -> None:
    """The catalogue got version 2 while an admitted request's worker died: the
    redelivery renders version 1, as the request would have without the crash; a new
    request gets version 2."""
    catalogue = two_versions(tmp_path, keep_first=True)
    service, ports = make(
        authorizer=FakeAuthorizer(users={"mia": MARKETING}), templates=lambda: catalogue
    )
    admitted_then_died(ports, catalogue, "t6")
    result = (await service.handle(hero("t6"), principal="mia")).result
    assert result.status is Status.SUCCEEDED, result.message
    assert ports.engine.calls[0][0].prompt.startswith("Studio product photograph")
    received = ports.audit.payloads("t6", "received")
    assert received[-1]["template"]["version"] == 1

    fresh = (await service.handle(hero("t7"), principal="mia")).result
    assert fresh.status is Status.SUCCEEDED
    assert ports.engine.calls[1][0].prompt.startswith("Catalogue photograph")
    assert ports.audit.payloads("t7", "received")[0]["template"]["version"] == 2


async def test_a_takeover_whose_template_version_is_gone_renders_the_current_one(
    tmp_path: Path,
) -> None:
    catalogue = two_versions(tmp_path, keep_first=False)
    service, ports = make(
        authorizer=FakeAuthorizer(users={"mia": MARKETING}), templates=lambda: catalogue
    )
    admitted_then_died(ports, load_catalogue(SHIPPED), "t8")
    result = (await service.handle(hero("t8"), principal="mia")).result
    assert result.status is Status.SUCCEEDED, result.message
    assert ports.engine.calls[0][0].prompt.startswith("Catalogue photograph")
    assert ports.audit.payloads("t8", "received")[-1]["template"]["version"] == 2
