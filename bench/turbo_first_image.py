"""Time to first image of a fresh process: imports, model load, compile (from the
on-disk cache when it is warm), warmup, one 1024x1024 image. Writes one JSON file.

    python bench/turbo_first_image.py --cache DIR --out FILE.json
    python bench/turbo_first_image.py --cache DIR --model MODEL_DIR --out FILE.json
    python bench/turbo_first_image.py --cache DIR --model MODEL_DIR --memory-mode model_offload \
        --requests 1,1,1,4 --out FILE.json

Without --model the full-size architecture is built with random weights on the GPU. With
--model the weights are read from a diffusers directory on local disk through
``load_engine``, the worker's own path (locate, identify, from_pretrained, place,
optimize). The engine runs the default settings (the benchmark's "opt" variant), so a
cache the benchmark filled is warm for exactly these graphs. --requests times further
requests of the given batch sizes after the first image (s/image and peak memory, for
the 24 GB-class memory mode).
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402

from zimage_pipeline.engine import load_engine  # noqa: E402
from zimage_pipeline.engine.architecture import FULL, TINY, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig, Placement  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity  # noqa: E402
from zimage_pipeline.engine.optimize import optimize_pipeline  # noqa: E402
from zimage_pipeline.engine.types import GenerationSpec  # noqa: E402


def random_engine(a: argparse.Namespace, dev: torch.device, r: dict[str, Any]) -> TurboEngine:
    t = time.perf_counter()
    pipe = build_random_pipeline(
        TINY if a.tiny else FULL,
        seed=0,
        dtype=torch.float32 if a.tiny else torch.bfloat16,
        device=dev,
    )
    pipe.set_progress_bar_config(disable=True)
    r["build_s"] = time.perf_counter() - t
    config = EngineConfig(
        model_path="(in memory)",
        device=str(dev),
        max_batch=4,
        compile=True,
        compile_cache_dir=a.cache,
        **lib.VARIANTS["opt"],
    )
    compiled = optimize_pipeline(pipe, config=config, device=dev)
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    return TurboEngine(pipe, config=config, device=dev, identity=identity, compiled=compiled)


class _Messages(logging.Handler):
    """load_engine's own log line: its step times (identify, read, place, optimize)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def disk_engine(a: argparse.Namespace, dev: torch.device, r: dict[str, Any]) -> TurboEngine:
    messages = _Messages()
    logger = logging.getLogger("zimage_pipeline.engine")
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    t = time.perf_counter()
    config = EngineConfig(
        model_path=a.model,
        device=str(dev),
        max_batch=4,
        compile=True,
        compile_cache_dir=a.cache,
        memory_mode=Placement(a.memory_mode),
        **lib.VARIANTS["opt"],
    )
    engine = load_engine(config)
    r["load_engine_s"] = time.perf_counter() - t  # identify + read + place + optimize
    r["load_log"] = [line for line in messages.lines if line.startswith("model ")]
    logger.removeHandler(messages)
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--model", default=None, help="diffusers directory to load (worker path)")
    p.add_argument("--memory-mode", default="gpu", choices=[m.value for m in Placement])
    p.add_argument("--requests", default="", help="batch sizes timed after the first image")
    a = p.parse_args()
    dev = torch.device("cpu" if a.tiny else "cuda")
    size = a.size or (256 if a.tiny else 1024)
    r: dict[str, Any] = {
        "import_s": time.perf_counter() - PROCESS_START,
        "cache": a.cache,
        "model": a.model or "(random, built on the device)",
        "memory_mode": a.memory_mode,
    }
    engine = disk_engine(a, dev, r) if a.model else random_engine(a, dev, r)
    r["warmup_s"] = engine.warmup(width=size, height=size)
    t = time.perf_counter()
    engine.generate([GenerationSpec("a red fox in fresh snow", seed=1, width=size, height=size)])
    lib.sync(dev)
    r["first_request_s"] = time.perf_counter() - t
    r["time_to_first_image_s"] = time.perf_counter() - PROCESS_START
    r["time_to_ready_s"] = r["time_to_first_image_s"] - r["first_request_s"]
    from torch._dynamo.utils import counters

    # Warm means hits: inductor's FX graph cache counts each compiled graph it served.
    r["compile_cache"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    runs = []
    for n, batch in enumerate(int(b) for b in a.requests.split(",") if b.strip()):
        lib.reset_peak(dev)
        specs = [
            GenerationSpec("a red fox in fresh snow", seed=100 * n + i, width=size, height=size)
            for i in range(batch)
        ]
        seconds, images = lib.timed(lambda: engine.generate(specs), dev)  # noqa: B023
        timings = images[0].timings
        runs.append(
            {
                "batch": batch,
                "s": seconds,
                "s_per_image": seconds / batch,
                "stages_s": [timings.encode_prompt_s, timings.denoise_s, timings.decode_s],
                "peak_gib": lib.peak_gib(dev),
                "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30
                if dev.type == "cuda"
                else None,
            }
        )
    r["requests"] = runs
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
