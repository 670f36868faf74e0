"""Time to first image of a fresh process: imports, model build, compile (from the
on-disk cache when it is warm), warmup, one 1024x1024 image. Writes one JSON file.

    python bench/turbo_first_image.py --cache DIR --out FILE.json

The model is the full-size architecture with random weights built on the GPU (about
8 s); real weights would be read from local disk instead (20 GB at the disk's speed).
The engine is configured as the benchmark's "opt" variant, so a cache the benchmark
filled is warm for exactly these graphs.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402

from zimage_pipeline.engine.architecture import FULL, TINY, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity  # noqa: E402
from zimage_pipeline.engine.optimize import optimize_pipeline  # noqa: E402
from zimage_pipeline.engine.types import GenerationSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=None)
    a = p.parse_args()
    dev = torch.device("cpu" if a.tiny else "cuda")
    size = a.size or (256 if a.tiny else 1024)
    r: dict[str, object] = {"import_s": time.perf_counter() - PROCESS_START, "cache": a.cache}
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
    engine = TurboEngine(pipe, config=config, device=dev, identity=identity, compiled=compiled)
    r["warmup_s"] = engine.warmup(width=size, height=size)
    t = time.perf_counter()
    engine.generate([GenerationSpec("a red fox in fresh snow", seed=1, width=size, height=size)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    r["first_request_s"] = time.perf_counter() - t
    r["time_to_first_image_s"] = time.perf_counter() - PROCESS_START
    r["time_to_ready_s"] = r["time_to_first_image_s"] - r["first_request_s"]  # type: ignore[operator]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
