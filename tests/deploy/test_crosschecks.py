"""What the chart, the alerts and the dashboard say about the worker, checked against the
worker itself so that neither can drift: the queues it declares, the HTTP routes and
port it serves, the metrics it registers, its drain setting, its commands and settings."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import os
import re
import signal
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client.metrics import MetricWrapperBase
from typer.testing import CliRunner

from tests.deploy.chart import (
    CHART,
    NAMESPACE,
    Rendered,
    chart_defaults,
    container,
    env_of,
    one,
    production_values,
    render,
)
from tests.deploy.dockerfile import exec_form, instructions
from zimage_pipeline.cli import app
from zimage_pipeline.messages import Priority, Status
from zimage_pipeline.observability import Metrics
from zimage_pipeline.policy import load_rules
from zimage_pipeline.reasons import Reason
from zimage_pipeline.settings import BrokerSettings, Settings, WorkerSettings, load_settings
from zimage_pipeline.worker.health import HealthServer
from zimage_pipeline.worker.runner import HANG_EXIT_MARGIN_S, run_worker
from zimage_pipeline.worker.topology import declare_topology

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = CHART / "dashboards" / "zimage-pipeline.json"

# -- the queues the worker declares ------------------------------------------------------


@dataclass
class _Declared:
    name: str
    bindings: list[dict[str, Any]] = field(default_factory=list)

    async def bind(self, exchange: object, **kwargs: Any) -> None:
        self.bindings.append(kwargs)

    async def unbind(self, exchange: object, **kwargs: Any) -> None:
        return None


@dataclass
class _RecordingChannel:
    """Takes the worker's declarations (worker/topology.py) without a broker."""

    queues: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def declare_exchange(self, name: str, *args: Any, **kwargs: Any) -> _Declared:
        return _Declared(name)

    async def declare_queue(
        self, name: str, *args: Any, arguments: dict[str, Any] | None = None, **kwargs: Any
    ) -> _Declared:
        self.queues[name] = dict(arguments or {})
        return _Declared(name)


@dataclass(frozen=True)
class DeclaredQueues:
    all: set[str]
    priority: dict[str, str]  # priority class -> queue name
    dlq: str


def declared_queues(broker: BrokerSettings) -> DeclaredQueues:
    channel = _RecordingChannel()
    topology = asyncio.run(declare_topology(channel, broker, WorkerSettings()))  # type: ignore[arg-type]
    return DeclaredQueues(
        all=set(channel.queues),
        priority={p.value: q.name for p, q in topology.priority_queues.items()},
        dlq=topology.dlq.name,
    )


def test_scaled_object_triggers_are_the_priority_queues_the_worker_declares() -> None:
    objects = render(production_values())
    queues = declared_queues(BrokerSettings())
    triggers = one(objects, "ScaledObject")["spec"]["triggers"]
    assert {t["name"]: t["metadata"]["queueName"] for t in triggers} == queues.priority
    assert {p.value for p in Priority} == set(queues.priority)
    auth = one(objects, "TriggerAuthentication")["metadata"]["name"]
    assert all(t["authenticationRef"]["name"] == auth for t in triggers)
    assert all(t["type"] == "rabbitmq" and t["metadata"]["mode"] == "QueueLength" for t in triggers)
    # The chart's default queue name is the worker's.
    assert chart_defaults()["broker"]["requestsQueue"] == BrokerSettings().requests_queue


def test_a_renamed_queue_moves_the_workers_triggers_and_alerts_together() -> None:
    values = copy.deepcopy(production_values())
    values["broker"]["requestsQueue"] = "acme.images"
    objects = render(values)
    settings = _settings_of(objects)
    assert settings.broker.requests_queue == "acme.images"
    queues = declared_queues(settings.broker)
    triggers = one(objects, "ScaledObject")["spec"]["triggers"]
    assert {t["name"]: t["metadata"]["queueName"] for t in triggers} == queues.priority
    rule_queues = _rule_queue_matchers(objects)
    assert rule_queues, "the alerts name no queue"
    for op, value in rule_queues:
        matched = _queues_matched(op, value, queues.all)
        assert matched in ({queues.dlq}, set(queues.priority.values())), (op, value, matched)


# -- probes, port and drain --------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_probe_paths_are_the_worker_routes() -> None:
    objects = render(production_values())
    worker = container(objects)
    paths = {
        probe: worker[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    monitor = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    ready = [True]
    problem: list[str | None] = [None]

    async def probe() -> dict[str, tuple[int, str]]:
        metrics = Metrics()
        metrics.jobs.labels("succeeded", "").inc()
        server = HealthServer(
            registry=metrics.registry,
            is_ready=lambda: ready[0],
            host="127.0.0.1",
            port=0,
            problem=lambda: problem[0],
        )
        await server.start()
        try:
            answers: dict[str, tuple[int, str]] = {}
            for name, path in [*paths.items(), ("metrics", monitor["path"])]:
                answers[name] = await asyncio.to_thread(_get, server.port, path)
            ready[0] = False  # draining: consumers cancelled
            problem[0] = "GENERATION_TIMEOUT: test"  # a hung GPU
            answers["draining"] = await asyncio.to_thread(
                _get, server.port, paths["readinessProbe"]
            )
            answers["hung"] = await asyncio.to_thread(_get, server.port, paths["livenessProbe"])
            answers["unknown"] = await asyncio.to_thread(_get, server.port, "/health")
            return answers
        finally:
            await server.stop()

    answers = asyncio.run(probe())
    assert answers["startupProbe"][0] == answers["livenessProbe"][0] == 200
    assert answers["readinessProbe"][0] == 200
    assert answers["metrics"][0] == 200 and "zimage_jobs_total" in answers["metrics"][1]
    assert answers["draining"][0] == 503
    assert answers["hung"][0] == 503
    assert answers["unknown"][0] == 404  # a wrong path would fail the probe, not pass it


@pytest.mark.parametrize("values_name", ["defaults", "production"])
def test_probe_port_is_the_worker_port(values_name: str) -> None:
    values = {} if values_name == "defaults" else production_values()
    objects = render(values)
    worker = container(objects)
    (port,) = [p for p in worker["ports"] if p["name"] == "http"]
    settings = _settings_of(objects)
    assert port["containerPort"] == settings.worker.http_port
    assert settings.worker.http_host == "0.0.0.0"  # noqa: S104 (the kubelet probes the pod IP)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"]["port"] == "http"
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    if values_name == "defaults":
        assert settings.worker.http_port == WorkerSettings().http_port
    # The preStop hook asks the same port for /readyz.
    script = worker["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert f"127.0.0.1:{settings.worker.http_port}/readyz" in script


@pytest.mark.parametrize("values_name", ["defaults", "production"])
def test_grace_period_outlasts_the_drain(values_name: str) -> None:
    values = {} if values_name == "defaults" else production_values()
    objects = render(values)
    settings = _settings_of(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    # The drain (shutdown_grace_s for in-flight work) plus the worker's own backstop
    # margin must end before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > (
        settings.worker.shutdown_grace_s + HANG_EXIT_MARGIN_S
    )
    if values_name == "production":
        assert settings.worker.shutdown_grace_s == values["worker"]["shutdownGraceSeconds"]


def test_prestop_starts_the_drain() -> None:
    worker = container(render({}))
    command = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    script = command[2]
    compile(script, "preStop", "exec")  # valid Python
    assert "os.kill(1, signal.SIGTERM)" in script
    # PID 1 is tini, which passes SIGTERM on to the worker; the worker drains on it.
    entrypoint = _image_entrypoint()
    assert entrypoint[0].endswith("tini")
    source = inspect.getsource(run_worker)
    assert "signal.SIGTERM" in source and "add_signal_handler" in source
    assert signal.SIGTERM.value == 15


# -- commands, settings, secrets ---------------------------------------------------------


def _image_entrypoint() -> list[str]:
    found = [
        exec_form(i.value) for i in instructions(ROOT / "Dockerfile") if i.keyword == "ENTRYPOINT"
    ]
    return found[-1]


def test_migration_job_runs_the_real_command_before_the_workers() -> None:
    objects = render(production_values())
    job = one(objects, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    config_hook = one(objects, "ConfigMap", "-migrate-config")["metadata"]["annotations"]
    assert int(config_hook["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    migrate = container(objects, "Job")
    assert "command" not in migrate  # the image's entrypoint: zimage-pipeline
    assert _image_entrypoint()[-1] == "zimage-pipeline"
    assert migrate["args"] == ["db", "upgrade"]
    result = CliRunner().invoke(app, [*migrate["args"], "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "upgrade" in result.output
    worker = container(objects)
    assert migrate["image"] == worker["image"]
    assert "command" not in worker and worker["args"] == ["worker"]
    assert CliRunner().invoke(app, ["worker", "--help"]).exit_code == 0
    # Same configuration and secrets as the workers, from the hook's own ConfigMap.
    assert migrate["env"] == worker["env"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"].endswith("-migrate-config")
    assert "templates" not in volumes


def _settings_of(objects: list[Rendered]) -> Settings:
    """The worker's settings in the rendered pod: the ConfigMap's files and the
    container's environment, loaded by the worker's own loader."""
    data = one(objects, "ConfigMap", "-config")["data"]
    env = env_of(container(objects))
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in [n for n in os.environ if n.startswith("ZIMAGE_")]:
            mp.delenv(name)
        (tmp / "zimage.toml").write_text(data["zimage.toml"], encoding="utf-8")
        (tmp / "policy.toml").write_text(data["policy.toml"], encoding="utf-8")
        for name, value in env.items():
            if name == "ZIMAGE_CONFIG":
                assert value == "/app/config/zimage.toml"
                continue
            if name == "ZIMAGE_POLICY__FILE":
                assert value == "/app/config/policy.toml"
                value = str(tmp / "policy.toml")
            mp.setenv(name, value)
        settings = load_settings(tmp / "zimage.toml")
        load_rules(settings.policy)  # the policy parses as the worker's
        return settings


@pytest.mark.parametrize("values_name", ["defaults", "production"])
def test_rendered_configuration_loads_in_the_worker(values_name: str) -> None:
    values = {} if values_name == "defaults" else production_values()
    objects = render(values)
    settings = _settings_of(objects)
    env = env_of(container(objects))
    assert str(settings.engine.model_path) == env["ZIMAGE_ENGINE__MODEL_PATH"]
    assert settings.engine.compile_cache_dir.startswith(
        values.get("compileCache", {}).get("mountPath", "/var/cache/zimage") + "/"
    )
    # Every ZIMAGE_<SECTION>__<KEY> the chart sets names a real setting.
    for name in env:
        if name == "ZIMAGE_CONFIG" or not name.startswith("ZIMAGE_"):
            continue
        section, _, key = name.removeprefix("ZIMAGE_").lower().partition("__")
        assert section in Settings.model_fields, name
        assert key in type(Settings.model_fields[section].default).model_fields, name


def test_secret_files_reach_the_worker_as_files() -> None:
    values = production_values()
    objects = render(values)
    settings = _settings_of(objects)
    worker = container(objects)
    env = env_of(worker)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in worker["volumeMounts"] if m["name"] == "secret-files"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "secret-files"]
    projected = {
        (s["secret"]["name"], item["key"]): item["path"]
        for s in volume["projected"]["sources"]
        for item in s["secret"]["items"]
    }
    assert values["secretFiles"]
    routes = settings.plugins.tables()["webhook"]["publishers"]
    route_files = {str(route["secret_file"]) for route in routes.values()}
    mounted_only = 0
    for entry in values["secretFiles"]:
        relative = projected[(entry["secretName"], entry["key"])]
        mounted = f"{mount['mountPath']}/{relative}"
        if "setting" not in entry:
            # Mounted only: the webhook route that names this path reads it.
            assert mounted in route_files, entry
            mounted_only += 1
            continue
        section, key = entry["setting"].split(".")
        path = getattr(getattr(settings, section), key)
        assert isinstance(path, Path), entry  # a real *_file setting, typed as a path
        assert str(path) == mounted
        assert env[f"ZIMAGE_{section.upper()}__{key.upper()}"] == str(path)
    assert mounted_only == len(route_files) == 2  # one secret per tenant
    # No secret in an environment variable's value, and none in the ConfigMap.
    for name in env:
        assert not re.search(r"PASSWORD$|SECRET_ACCESS_KEY$|_KEY$", name), name
    assert "password" not in one(objects, "ConfigMap", "-config")["data"]["zimage.toml"]


# -- metrics in the alerts and the dashboard ---------------------------------------------

# Labels Prometheus adds to every target a ServiceMonitor scrapes.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}

# RabbitMQ's rabbitmq_prometheus plugin (deps/rabbitmq_prometheus/src/collectors/
# prometheus_rabbitmq_core_metrics_collector.erl in rabbitmq/rabbitmq-server): per queue
# on /metrics/per-object with prefix rabbitmq_, on /metrics/detailed with
# rabbitmq_detailed_. Only the ones the chart uses.
RABBITMQ_METRICS = {
    f"{prefix}{name}"
    for prefix in ("rabbitmq_", "rabbitmq_detailed_")
    for name in ("queue_messages_ready", "queue_messages", "queue_consumers")
}
RABBITMQ_LABELS = {"queue", "vhost"} | TARGET_LABELS
# NVIDIA dcgm-exporter's GPU utilisation (default counters file), opt-in.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL"}
PROMETHEUS_METRICS = {"up"}


def worker_metrics() -> dict[str, set[str]]:
    """Every series name the worker's registry can expose -> its label names."""
    metrics = Metrics()
    out: dict[str, set[str]] = {}
    for wrapper in vars(metrics).values():
        if not isinstance(wrapper, MetricWrapperBase):
            continue
        labels = set(wrapper._labelnames)
        base = wrapper._name
        kind = wrapper._type
        names = {
            "counter": [f"{base}_total"],
            "gauge": [base],
            "histogram": [f"{base}_bucket", f"{base}_sum", f"{base}_count"],
        }[kind]
        for name in names:
            out[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return out


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)


def selectors(expr: str) -> list[Selector]:
    parsed = promql_parser.parse(expr)  # raises on a PromQL syntax error
    found: list[Selector] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [
                (m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers
            ]
            found.append(Selector(str(node.name), matchers))
        return True

    promql_parser.walk(parsed, visit)
    return found


def _rule_exprs(objects: list[Rendered]) -> dict[str, str]:
    rule = one(objects, "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def _rule_queue_matchers(objects: list[Rendered]) -> list[tuple[str, str]]:
    return [
        (op, value)
        for expr in _rule_exprs(objects).values()
        for sel in selectors(expr)
        for label, op, value in sel.matchers
        if label == "queue"
    ]


def _queues_matched(op: str, value: str, names: set[str]) -> set[str]:
    if op == "Equal":
        return {value} & names
    assert op == "Re", op
    return {n for n in names if re.fullmatch(value, n)}


def _check_selectors(where: str, exprs: dict[str, str], queues: DeclaredQueues) -> set[str]:
    known = worker_metrics()
    used: set[str] = set()
    for title, expr in exprs.items():
        sels = selectors(expr)
        assert sels, f"{where} {title}: no metric"
        for sel in sels:
            used.add(sel.name)
            labels = {label for label, _, _ in sel.matchers}
            if sel.name in known:
                assert labels <= known[sel.name] | TARGET_LABELS, (title, sel)
                for label, op, value in sel.matchers:
                    if label == "status":
                        assert op == "Equal" and value in {s.value for s in Status}, (title, value)
                    if label == "reason":
                        assert op == "Equal" and value in {r.value for r in Reason}, (title, value)
            elif sel.name in RABBITMQ_METRICS:
                assert labels <= RABBITMQ_LABELS, (title, sel)
                (queue,) = [(op, v) for label, op, v in sel.matchers if label == "queue"]
                matched = _queues_matched(*queue, queues.all)
                assert matched in ({queues.dlq}, set(queues.priority.values())), (title, matched)
            elif sel.name in DCGM_METRICS or sel.name in PROMETHEUS_METRICS:
                pass
            else:
                pytest.fail(f"{where} {title}: {sel.name} is neither the worker's nor documented")
    return used


def test_every_alert_uses_real_metrics() -> None:
    objects = render(production_values())
    exprs = _rule_exprs(objects)
    assert {
        "ZImageErrorRateHigh",
        "ZImageLedgerErrors",
        "ZImageWorkerDown",
        "ZImageGPUBusy",
        "ZImageDeadLetterQueueGrowing",
        "ZImageNoConsumers",
        "ZImageAuditAnchorStale",
    } == set(exprs)
    used = _check_selectors("alert", exprs, declared_queues(BrokerSettings()))
    assert {
        "zimage_jobs_total",
        "zimage_retries_total",
        "zimage_audit_anchor_age_seconds",
        "zimage_audit_anchor_interval_seconds",
    } <= used
    # Worker series are selected by the ServiceMonitor's job label in this namespace.
    for expr in exprs.values():
        for sel in selectors(expr):
            if sel.name.startswith("zimage_") or sel.name == "up":
                assert ("namespace", "Equal", NAMESPACE) in sel.matchers, expr
    # ... and job is the Service's name, which the ServiceMonitor selects.
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    for expr in exprs.values():
        for sel in selectors(expr):
            if sel.name.startswith("zimage_") or sel.name == "up":
                assert ("job", "Equal", service["metadata"]["name"]) in sel.matchers, expr


def test_alert_thresholds_follow_the_values() -> None:
    values = production_values()
    exprs = _rule_exprs(render(values))
    assert (
        exprs["ZImageErrorRateHigh"]
        .rstrip()
        .endswith(f"> {values['metrics']['prometheusRule']['errorRate']['threshold']}")
    )
    assert '"failed"' in exprs["ZImageErrorRateHigh"]
    assert '"LEDGER_UNAVAILABLE"' in exprs["ZImageLedgerErrors"]
    rule_values = {
        **chart_defaults()["metrics"]["prometheusRule"],
        **values["metrics"]["prometheusRule"],
    }
    anchor = rule_values["anchorAge"]["factor"]
    assert (
        f"> {anchor} * max(zimage_audit_anchor_interval_seconds" in exprs["ZImageAuditAnchorStale"]
    )


def test_the_anchor_alert_compares_the_age_with_the_configured_interval() -> None:
    """The interval series the alert multiplies is the worker's audit.anchor_interval_s,
    and the age series is the anchorer's own clock (worker/gauges.py)."""
    from zimage_pipeline.worker.gauges import watch_anchor_age

    class Anchorer:
        def seconds_since_anchored(self) -> float:
            return 123.0

    objects = render(production_values())
    settings = _settings_of(objects)
    metrics = Metrics()
    watch_anchor_age(metrics, Anchorer(), settings.audit.anchor_interval_s)  # type: ignore[arg-type]
    registry = metrics.registry
    assert registry.get_sample_value("zimage_audit_anchor_age_seconds") == 123.0
    assert (
        registry.get_sample_value("zimage_audit_anchor_interval_seconds")
        == settings.audit.anchor_interval_s
    )


def _dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    defaults = {
        v["name"]: v.get("query") for v in dashboard["templating"]["list"] if v["type"] == "textbox"
    }
    substitutions = {
        "$__rate_interval": "5m",
        "$queue_prefix": str(defaults["queue_prefix"]),
        "$vhost": str(defaults["vhost"]),
        "$namespace": NAMESPACE,
        "$job": "zimage-zimage-pipeline",
    }
    exprs: dict[str, str] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in substitutions.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, (panel["title"], expr)
            exprs[f"{panel['title']} / {target['refId']}"] = expr
    return exprs


def test_dashboard_uses_real_metrics() -> None:
    dashboard = _dashboard()
    defaults = {v["name"]: v.get("query") for v in dashboard["templating"]["list"]}
    assert defaults["queue_prefix"] == BrokerSettings().requests_queue
    exprs = _dashboard_exprs(dashboard)
    used = _check_selectors("panel", exprs, declared_queues(BrokerSettings()))
    for needed in (
        "zimage_images_total",
        "zimage_jobs_total",
        "zimage_phase_seconds_bucket",
        "zimage_retries_total",
        "zimage_gpu_memory_allocated_bytes",
        "zimage_queue_wait_seconds_bucket",
        "zimage_team_quota_used_images",
        "zimage_team_quota_limit_images",
        "zimage_audit_anchor_age_seconds",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages",
        "DCGM_FI_DEV_GPU_UTIL",
    ):
        assert needed in used, needed


def test_dashboard_is_in_the_chart_as_the_file() -> None:
    objects = render(production_values())
    config_map = one(objects, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["zimage-pipeline.json"]) == _dashboard()
