"""LoRA adapters on the request path: named by catalogue only, resolved before the
ledger (an unknown name costs nothing), fixed by a template, recorded in the model
identity (result, audit record, provenance label) and checked by `check`."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.fakes import GENEROUS, FakeAuthorizer
from tests.unit.test_service import body, make
from zimage_pipeline.adapters import (
    NO_ADAPTERS,
    AdapterCatalogue,
    AdapterEntry,
    AdapterUse,
    catalogue_of,
)
from zimage_pipeline.checks import check_adapters
from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.messages import GenerationRequest, Status
from zimage_pipeline.ports import ModelIdentity
from zimage_pipeline.results import generated_payload
from zimage_pipeline.settings import load_settings
from zimage_pipeline.templates.catalogue import Catalogue, Entry
from zimage_pipeline.templates.model import Template
from zimage_pipeline.templates.render import apply
from zimage_pipeline.wiring.outputs import model_label

SPRING = AdapterEntry("spring-pastel", "/nowhere/spring.safetensors", "a" * 64, weight=0.8)
INK = AdapterEntry("ink", "/nowhere/ink.safetensors", "b" * 64)
CATALOGUE = AdapterCatalogue.of([SPRING, INK], max_active=2)


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {"request_id": "r1", "on_behalf_of": "alice", "prompt": "a cat", **fields}
    )


def test_the_contract_takes_names_and_bounded_weights_only() -> None:
    assert request(adapters=[{"name": "ink", "weight": 0.5}]).adapters[0].weight == 0.5
    for bad in (
        [{"name": "../etc/passwd"}],
        [{"path": "/tmp/x.safetensors"}],
        [{"name": "ink", "weight": 3.0}],
        [{"name": "ink"}] * 5,
    ):
        with pytest.raises(ValidationError):
            request(adapters=bad)


def test_resolution_fills_weights_and_refuses_unknown_names_naming_them() -> None:
    resolved = CATALOGUE.resolve(request(adapters=[{"name": "spring-pastel"}, {"name": "ink"}]))
    assert [(a.name, a.weight) for a in resolved.adapters] == [("spring-pastel", 0.8), ("ink", 1.0)]
    assert CATALOGUE.uses(resolved) == (
        AdapterUse("spring-pastel", "a" * 64, 0.8),
        AdapterUse("ink", "b" * 64, 1.0),
    )
    with pytest.raises(InvalidRequestError, match=r"adapters\[0\]\.name: unknown adapter 'wet'"):
        CATALOGUE.resolve(request(adapters=[{"name": "wet"}]))
    with pytest.raises(InvalidRequestError, match="named twice"):
        CATALOGUE.resolve(request(adapters=[{"name": "ink"}, {"name": "ink"}]))
    one_slot = AdapterCatalogue.of([SPRING, INK], max_active=1)
    with pytest.raises(InvalidRequestError, match="at most 1 at once"):
        one_slot.resolve(request(adapters=[{"name": "ink"}, {"name": "spring-pastel"}]))
    with pytest.raises(InvalidRequestError, match="none configured"):
        NO_ADAPTERS.resolve(request(adapters=[{"name": "ink"}]))


def test_a_template_fixes_its_adapters() -> None:
    template = Template.model_validate(
        {"id": "spring", "version": 1, "prompt": "{prompt}, spring", "adapters": [{"name": "ink"}]}
    )
    entry = Entry(template=template, file="spring.toml", sha256="c" * 64)
    rendered = apply(entry, request(template={"id": "spring"}))
    assert [a.name for a in rendered.adapters] == ["ink"]
    with pytest.raises(InvalidRequestError, match="fixes its own adapters"):
        apply(entry, request(template={"id": "spring"}, adapters=[{"name": "spring-pastel"}]))


async def test_an_unknown_adapter_is_invalid_before_any_charge() -> None:
    service, ports = make(adapters=CATALOGUE)
    result = (await service.handle(body(adapters=[{"name": "wet"}]), principal="alice")).result
    assert (result.status, result.reason) == (Status.REJECTED, "INVALID_REQUEST")
    assert "unknown adapter 'wet'" in (result.message or "")
    assert not ports.ledger.quota.committed and not ports.engine.calls  # type: ignore[attr-defined]
    assert not ports.ledger.quota.reserved  # type: ignore[attr-defined]


INK_ONLY = replace(GENEROUS, adapters=frozenset({"ink"}))


async def test_an_adapter_outside_the_roles_is_not_authorized_and_costs_nothing() -> None:
    # A brand's trained style is its own: this role may name ink only.
    service, ports = make(adapters=CATALOGUE, authorizer=FakeAuthorizer(users={"alice": INK_ONLY}))
    asked = body(adapters=[{"name": "ink"}, {"name": "spring-pastel"}])
    result = (await service.handle(asked, principal="alice")).result
    assert (result.status, result.reason) == (Status.REJECTED, "NOT_AUTHORIZED")
    assert result.message == (
        "adapters[1]: 'alice' may not use adapter 'spring-pastel' (its roles allow ink)"
    )
    assert not ports.ledger.quota.reserved and not ports.engine.calls  # type: ignore[attr-defined]
    # Nor does a name it may not use learn the catalogue from an "unknown adapter" answer.
    unknown = await service.handle(body("r2", adapters=[{"name": "wet"}]), principal="alice")
    assert unknown.result.reason == "NOT_AUTHORIZED"
    assert "spring-pastel" not in (unknown.result.message or "")
    allowed = await service.handle(body("r3", adapters=[{"name": "ink"}]), principal="alice")
    assert allowed.result.status == Status.SUCCEEDED


async def test_adapters_a_template_fixes_come_with_the_template() -> None:
    template = Template.model_validate(
        {
            "id": "spring",
            "version": 1,
            "prompt": "{prompt}, spring",
            "adapters": [{"name": "spring-pastel"}],
        }
    )
    catalogue = Catalogue(entries={"spring": {1: Entry(template, "spring.toml", "c" * 64)}})
    service, ports = make(
        adapters=CATALOGUE,
        authorizer=FakeAuthorizer(users={"alice": INK_ONLY}),
        templates=lambda: catalogue,
    )
    asked = body(template={"id": "spring"})
    result = (await service.handle(asked, principal="alice")).result
    assert result.status == Status.SUCCEEDED, result.message
    assert ports.engine.calls[0][0].adapters == (("spring-pastel", 0.8),)  # type: ignore[attr-defined]


async def test_a_request_with_adapters_runs_them_and_records_them() -> None:
    service, ports = make(adapters=CATALOGUE)
    outcome = await service.handle(
        body(adapters=[{"name": "spring-pastel"}, {"name": "ink", "weight": 0.3}]),
        principal="alice",
    )
    result = outcome.result
    assert result.status == Status.SUCCEEDED
    [specs] = ports.engine.calls  # type: ignore[attr-defined]
    assert specs[0].adapters == (("spring-pastel", 0.8), ("ink", 0.3))
    assert result.model is not None
    assert [(a.name, a.sha256, a.weight) for a in result.model.adapters] == [
        ("spring-pastel", "a" * 64, 0.8),
        ("ink", "b" * 64, 0.3),
    ]
    # The audit events and record carry the same model dict (results._model_dict).
    model = ModelIdentity("m", None, None, adapters=(AdapterUse("ink", "b" * 64, 0.3),))
    payload = generated_payload(request(), model, [], {})
    assert payload["model"]["adapters"] == [{"name": "ink", "sha256": "b" * 64, "weight": 0.3}]
    assert (
        "adapters"
        not in generated_payload(request(), ModelIdentity("m", None, None), [], {})["model"]
    )


async def test_a_request_without_adapters_records_none() -> None:
    service, ports = make(adapters=CATALOGUE)
    result = (await service.handle(body(), principal="alice")).result
    assert result.model is not None and result.model.adapters == []
    assert ports.engine.calls[0][0].adapters == ()  # type: ignore[attr-defined]


def test_the_provenance_label_names_each_adapter_and_hash() -> None:
    model = ModelIdentity("Tongyi/Z-Image-Turbo", "main", "f" * 64)
    assert model_label(model) == "Tongyi/Z-Image-Turbo@main"
    with_adapters = ModelIdentity(
        "Tongyi/Z-Image-Turbo", "main", "f" * 64, adapters=(AdapterUse("ink", "b" * 64, 0.5),)
    )
    assert model_label(with_adapters) == "Tongyi/Z-Image-Turbo@main+lora:ink@bbbbbbbbbbbb*0.5"


def test_settings_resolve_adapter_paths_beside_the_config_file(tmp_path: Path) -> None:
    weights = tmp_path / "adapters" / "ink.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"not really a LoRA")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    config = tmp_path / "zimage.toml"
    config.write_text(
        f'[adapters.ink]\npath = "adapters/ink.safetensors"\nsha256 = "{digest}"\nweight = 0.5\n'
        f'[adapters.wet]\npath = "adapters"\nsha256 = "{"0" * 64}"\n'
    )
    settings = load_settings(config)
    [ink, wet] = catalogue_of(settings)
    assert Path(ink.path) == weights and ink.weight == 0.5
    assert Path(wet.path) == weights.parent  # a directory: its one .safetensors file
    result = check_adapters(settings)
    assert not result.ok
    assert result.detail.startswith("wet: file sha256") and "ink" not in result.detail
    config.write_text(f'[adapters.ink]\npath = "adapters/ink.safetensors"\nsha256 = "{digest}"\n')
    assert check_adapters(load_settings(config)).detail == "1 verified (ink)"


def test_bad_catalogue_tables_are_config_errors(tmp_path: Path) -> None:
    from zimage_pipeline.errors import ConfigError

    config = tmp_path / "zimage.toml"
    config.write_text('[adapters.Bad_Name]\npath = "x"\nsha256 = "nothex"\n')
    with pytest.raises(ConfigError, match="adapters"):
        load_settings(config)
