"""The worker's `reload_config` job and what it tells operators: a refused catalogue or
policy leaves the last good one in use, counted, and named on /readyz (still ready)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.unit.test_templates import HERO, catalogue_dir
from zimage_pipeline.observability import Metrics
from zimage_pipeline.settings import load_settings
from zimage_pipeline.templates.holder import CatalogueHolder
from zimage_pipeline.worker.health import HealthServer
from zimage_pipeline.worker.runner import _config_details, _ConfigReload


async def readyz(port: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_refused_catalogue_is_counted_and_named_on_readyz(tmp_path: Path) -> None:
    directory = catalogue_dir(tmp_path, hero=HERO)
    policy = tmp_path / "policy.toml"
    policy.write_text("[roles.r]\ngenerate = true\n")
    settings = load_settings(policy={"file": str(policy)}, templates={"dir": str(directory)})
    wiring: Any = SimpleNamespace(templates=CatalogueHolder(directory))
    metrics = Metrics()
    job = _ConfigReload(settings, wiring, metrics).job()
    server = HealthServer(
        registry=metrics.registry,
        is_ready=lambda: True,
        host="127.0.0.1",
        port=0,
        details=lambda: _config_details(settings, wiring),
    )
    await server.start()
    try:
        job.run()
        assert await readyz(server.port) == (200, "ready\n")
        (directory / "hero.toml").write_text(HERO.replace("steps = 6", 'steps = "six"'))
        job.run()
        status, body = await readyz(server.port)
        assert status == 200  # still ready: the last good catalogue serves
        assert body.startswith(
            "ready\ntemplates: new files refused, last good in use: hero.toml:8:"
        )
        assert sample(metrics, "zimage_config_refused", config="templates") == 1
        assert (
            sample(metrics, "zimage_config_reloads_total", config="templates", result="refused")
            == 1
        )
        (directory / "hero.toml").write_text(HERO.replace("version = 1", "version = 2"))
        job.run()
        assert await readyz(server.port) == (200, "ready\n")
        assert sample(metrics, "zimage_config_refused", config="templates") == 0
        assert sample(metrics, "zimage_config_reloads_total", config="templates", result="ok") == 1
        policy.write_text('[groups]\n"cn=x" = ["ghost"]\n')
        os.utime(policy, ns=(1, 1))
        job.run()
        status, body = await readyz(server.port)
        assert status == 200 and "policy: new file refused, last good in use:" in body
        assert "undefined roles" in body
        assert sample(metrics, "zimage_config_refused", config="policy") == 1
    finally:
        await server.stop()
