"""The Helm chart, rendered by Helm's own Go SDK for the default values and the
production example, every object checked against the Kubernetes OpenAPI schemas or the
vendored KEDA / Prometheus Operator CRDs; wrong values fail the chart's schema."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.chart import (
    CHART,
    Rendered,
    chart_defaults,
    container,
    crd_kinds,
    one,
    production_values,
    render,
    validate,
    validate_builtin,
    validate_crd,
    validate_values,
)

VALUE_SETS = {"defaults": dict[str, Any](), "production": production_values()}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> list[Rendered]:
    return render(VALUE_SETS[request.param])


def test_lint_is_clean() -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(str(CHART), values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


def test_every_object_is_valid(rendered: list[Rendered]) -> None:
    assert rendered
    for r in rendered:
        try:
            validate(r.obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{r.template}: {r.kind} {r.name}: {exc}")


def test_default_release_has_no_custom_resources() -> None:
    # Without KEDA and the Prometheus Operator installed, the chart still installs.
    kinds = {r.kind for r in render({})}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }
    assert one(render({}), "Deployment")["spec"]["replicas"] == chart_defaults()["replicaCount"]


def test_production_release_has_everything() -> None:
    objects = render(production_values())
    kinds = {r.kind for r in objects}
    assert {
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "NetworkPolicy",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    custom = {(r.obj["apiVersion"], r.kind) for r in objects} & crd_kinds()
    assert len(custom) == 4  # each validated against its vendored CRD
    # KEDA owns the replica count.
    assert "replicas" not in one(objects, "Deployment")["spec"]


def test_keda_off_gives_a_fixed_replica_count() -> None:
    values = copy.deepcopy(production_values())
    values["keda"]["enabled"] = False
    values["replicaCount"] = 3
    objects = render(values)
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    assert not [r for r in objects if r.obj["apiVersion"].startswith("keda.sh/")]


def test_scale_to_zero() -> None:
    values = copy.deepcopy(production_values())
    values["keda"]["scaleToZero"] = True
    scaled = one(render(values), "ScaledObject")
    assert scaled["spec"]["minReplicaCount"] == 0
    validate(scaled)


def test_security_and_gpu() -> None:
    objects = render(production_values())
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    worker = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = worker["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
        == (one(objects, "Deployment")["spec"]["selector"]["matchLabels"])
    )
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    assert mounts["model"]["readOnly"] is True
    assert mounts["config"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "zimage-model"
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "zimage-compile-cache"
    # Writable: only /tmp, the cache and /dev/shm (the root filesystem is read-only).
    writable = {m["mountPath"] for m in worker["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/var/cache/zimage", "/dev/shm"}
    pdb = one(objects, "PodDisruptionBudget")
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == (one(objects, "Deployment")["spec"]["selector"]["matchLabels"])
    )


# -- wrong values fail ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("worker", "httpPort"), "9464"),  # a string
        (("worker", "httpPort"), 70000),
        (("worker", "terminationGraceMarginSeconds"), 5),  # under the hang backstop
        (("keda", "triggers", "urgent"), {"value": 1, "activationValue": 0}),  # no such queue
        (("keda", "maxReplicas"), 0),
        (("securityContext", "readOnlyRootFilesystem"), False),
        (("podSecurityContext", "runAsNonRoot"), False),
        (("secretFiles",), [{"setting": "broker.password", "secretName": "x", "key": "y"}]),
        (("metrics", "prometheusRule", "errorRate", "threshold"), 5),
        (("replicaCount",), -1),
        (("imageTag",), "latest"),  # unknown key
    ],
)
def test_wrong_values_fail_the_schema(path: tuple[str, ...], value: object) -> None:
    values = copy.deepcopy(production_values())
    node = values
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(helm.HelmValuesError):
        validate_values(values)
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_a_mounted_only_secret_that_no_setting_names_is_refused() -> None:
    values = copy.deepcopy(production_values())
    values["secretFiles"].append({"secretName": "forgotten", "key": "token"})
    with pytest.raises(helm.HelmRenderError, match="forgotten/token"):
        render(values)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("worker", "http_port"),
        ("worker", "shutdown_grace_s"),
        ("broker", "requests_queue"),
        ("engine", "model_path"),
        ("broker", "password_file"),  # also given by secretFiles in the example
    ],
)
def test_settings_the_chart_owns_are_refused_in_config(section: str, key: str) -> None:
    values = copy.deepcopy(production_values())
    values["config"]["settings"].setdefault(section, {})[key] = "x"
    with pytest.raises(helm.HelmRenderError, match=key):
        render(values)


def test_keda_needs_its_secret() -> None:
    values = copy.deepcopy(production_values())
    values["keda"]["auth"]["secretName"] = ""
    with pytest.raises(helm.HelmRenderError, match=r"keda\.auth\.secretName"):
        render(values)


def test_the_validators_refuse_wrong_objects() -> None:
    # The checks above would pass vacuously if the validators accepted anything.
    objects = render(production_values())
    deployment = copy.deepcopy(one(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(deployment)
    deployment = copy.deepcopy(one(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(deployment)
    scaled = copy.deepcopy(one(objects, "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(scaled)
    scaled = copy.deepcopy(one(objects, "ScaledObject"))
    scaled["spec"]["triggers"][0]["authRef"] = scaled["spec"]["triggers"][0]["authenticationRef"]
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(scaled)
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(rule)
    monitor = copy.deepcopy(one(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(monitor)


def test_settings_roll_the_workers_policy_and_templates_reload() -> None:
    def pod_template(values: dict[str, Any]) -> dict[str, Any]:
        spec = one(render(values), "Deployment")["spec"]["template"]
        assert isinstance(spec, dict)
        return spec

    base = production_values()
    before = pod_template(base)
    policy = copy.deepcopy(base)
    policy["config"]["policy"] += "\n[roles.viewer]\ngenerate = false\n"
    policy["config"]["templates"] = {"hero.toml": 'title = "Hero"\n'}
    changed = pod_template(policy)
    # The new templates directory is a new mount; the pod's annotations stay the same.
    assert changed["metadata"]["annotations"] == before["metadata"]["annotations"]
    settings = copy.deepcopy(base)
    settings["config"]["settings"]["engine"]["max_batch"] = 2
    assert pod_template(settings)["metadata"]["annotations"] != before["metadata"]["annotations"]
