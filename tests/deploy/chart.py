"""Rendering the Helm chart with Helm itself (helm-python-sdk binds Helm's Go SDK, no
binary, no cluster) and validating what comes out: the Kubernetes OpenAPI schemas
(kubernetes-validate) and the vendored CRDs' schemas (KEDA, Prometheus Operator)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "zimage-pipeline"
PRODUCTION = ROOT / "deploy" / "helm" / "examples" / "production.yaml"
CRDS = Path(__file__).resolve().parent / "crds"
RELEASE = "zimage"
NAMESPACE = "gpu-workers"
FULLNAME = f"{RELEASE}-zimage-pipeline"  # the chart's naming for this release
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the
# validator knows: every object must be valid in both.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


@dataclass(frozen=True, slots=True)
class Rendered:
    template: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


def production_values() -> dict[str, Any]:
    loaded = yaml.safe_load(PRODUCTION.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def chart_defaults() -> dict[str, Any]:
    loaded = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def validate_values(values: dict[str, Any]) -> None:
    """values.schema.json, as `helm install` applies it (raises HelmValuesError)."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)


def render(values: dict[str, Any] | None = None) -> list[Rendered]:
    """The release's objects for these values, after the schema check `helm install`
    makes; hooks included."""
    values = values or {}
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    out: list[Rendered] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert isinstance(doc, dict), (template, doc)
                out.append(Rendered(template, doc))
    return out


def one(objects: list[Rendered], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one object of `kind` named FULLNAME + name_suffix (any name if no suffix)."""
    found = [
        r.obj
        for r in objects
        if r.kind == kind and (not name_suffix or r.name == FULLNAME + name_suffix)
    ]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {len(found)}"
    return found[0]


def container(objects: list[Rendered], kind: str = "Deployment") -> dict[str, Any]:
    (first, *_) = one(objects, kind)["spec"]["template"]["spec"]["containers"]
    assert isinstance(first, dict)
    return first


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


# -- Kubernetes' own schemas -----------------------------------------------------------


def validate_builtin(obj: dict[str, Any]) -> None:
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# -- CRDs (vendored: tests/deploy/crds/README.md) --------------------------------------


def _structural_to_jsonschema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as a JSON Schema: `nullable`, int-or-string, and, as the
    API server's strict field validation does, unknown fields refused where the schema
    does not preserve them."""
    if isinstance(node, list):
        return [_structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural_to_jsonschema(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not crd:
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", False):
                    continue
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = _structural_to_jsonschema(
                    copy.deepcopy(schema)
                )
    return schemas


def crd_kinds() -> set[tuple[str, str]]:
    return set(_crd_schemas())


def validate_crd(obj: dict[str, Any]) -> None:
    key = (str(obj["apiVersion"]), str(obj["kind"]))
    schema = _crd_schemas().get(key)
    assert schema is not None, f"no vendored CRD for {key}"
    jsonschema.Draft7Validator(schema).validate(obj)


def validate(obj: dict[str, Any]) -> None:
    if (str(obj["apiVersion"]), str(obj["kind"])) in crd_kinds():
        validate_crd(obj)
    else:
        validate_builtin(obj)
