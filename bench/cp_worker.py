"""One control-plane benchmark worker: the real worker process with a stub engine.

    python bench/cp_worker.py   (started by bench/control_plane.py)

Settings load the normal way plus the benchmark's overrides (JSON in
ZIMAGE_BENCH_OVERRIDES); `wiring.build` binds the real adapters; only the engine and the
encoder are replaced (a fixed generation time, a fixed 1.5 MB payload), so the process
does exactly the control plane's work: one process per worker, as in production, each
with its own interpreter lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from zimage_pipeline.messages import ImageFormat  # noqa: E402
from zimage_pipeline.ports import EncodedImage, ModelIdentity, RawImage  # noqa: E402
from zimage_pipeline.settings import load_settings  # noqa: E402
from zimage_pipeline.wiring import build  # noqa: E402
from zimage_pipeline.worker.runner import run_worker  # noqa: E402

# Incompressible: what a 1024x1024 photo PNG weighs.
PAYLOAD = os.urandom(1_500_000)


class StubEngine:
    def __init__(self, generate_s: float, pixels: Image.Image | None = None) -> None:
        self.generate_s = generate_s
        self._pixels = pixels or Image.new("RGB", (1024, 1024))
        self.intervals: list[tuple[float, float]] = []  # (start, end) of each generation

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity("stub/z-image", None, "0" * 64)

    def generate(self, specs: Any) -> list[RawImage]:
        started = time.perf_counter()
        if self.generate_s:
            time.sleep(self.generate_s)
        self.intervals.append((started, time.perf_counter()))
        return [RawImage(self._pixels, s.seed, 1024, 1024, i) for i, s in enumerate(specs)]


class StubEncoder:
    def encode(self, image: RawImage, **_: Any) -> EncodedImage:
        return EncodedImage(PAYLOAD, ImageFormat.PNG, image.width, image.height, image.seed)


def main() -> int:
    overrides = json.loads(os.environ["ZIMAGE_BENCH_OVERRIDES"])
    generate_s = float(os.environ.get("ZIMAGE_BENCH_GENERATE_S", "0"))
    settings = load_settings(**overrides)
    wiring = build(settings, warmup=False)
    wiring.ports = replace(wiring.ports, engine=StubEngine(generate_s), encoder=StubEncoder())
    return asyncio.run(run_worker(settings, wiring))


if __name__ == "__main__":
    sys.exit(main())
