"""Round-3 check (issue 7): is the compiled denoise loop bound by the host, and does a CUDA
graph of the whole transformer forward (engine.transformer_graphs) remove that?

One process: the full-size model, the engine in its round-3 configuration (compiled),
then, without and with the transformer graphs: the host time to enqueue 8 forwards vs
their wall time, the engine's batch-1 and batch-4 timings, and the equality of the image.

    python bench/turbo_graph_probe.py --out "$OUT"
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402

from zimage_pipeline.engine.architecture import FULL, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.graphs import TransformerGraphs  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity  # noqa: E402
from zimage_pipeline.engine.optimize import optimize_pipeline  # noqa: E402
from zimage_pipeline.engine.types import GenerationSpec  # noqa: E402

PROMPT = (
    "A product photo of a blue ceramic teapot on an oak table, soft window light, "
    "shallow depth of field."
)


def loop_of_forwards(pipe: Any, probe: Any, dev: torch.device, n: int = 8) -> dict[str, float]:
    """Host seconds to enqueue n forwards, and their wall seconds (to the last kernel)."""
    lib.forward(pipe, probe)
    torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(n):
        lib.forward(pipe, probe)
    enqueued = time.perf_counter()
    torch.cuda.synchronize(dev)
    done = time.perf_counter()
    return {"enqueue_s": (enqueued - start) / n, "wall_s": (done - start) / n}


def engine_runs(engine: TurboEngine, dev: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch, repeats in ((1, 4), (4, 2)):
        specs = [GenerationSpec(PROMPT, seed=10 + i, width=1024, height=1024) for i in range(batch)]
        engine.generate(specs)  # untimed: a new shape's eager call and capture
        runs = [lib.timed(lambda s=specs: engine.generate(s), dev) for _ in range(repeats)]  # type: ignore[misc]
        out[str(batch)] = {
            "s_per_image": lib.median([t for t, _ in runs]) / batch,
            "denoise_s": lib.median([imgs[0].timings.denoise_s for _, imgs in runs]),
            "encode_s": lib.median([imgs[0].timings.encode_prompt_s for _, imgs in runs]),
            "decode_s": lib.median([imgs[0].timings.decode_s for _, imgs in runs]),
        }
        out[f"image{batch}"] = runs[-1][1][0].image
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    a = p.parse_args()
    dev = torch.device("cuda")
    r: dict[str, Any] = {"env": lib.device_info(dev)}
    pipe = build_random_pipeline(FULL, seed=0, dtype=torch.bfloat16, device=dev)
    pipe.set_progress_bar_config(disable=True)
    config = EngineConfig(
        model_path="(in memory)", device="cuda", max_batch=4, compile=True, **lib.VARIANTS["opt"]
    )
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    engine = TurboEngine(pipe, config=config, device=dev, identity=identity)
    engine.compiled = optimize_pipeline(pipe, config=config, device=dev)
    r["warmup_s"] = engine.warmup()
    probe = lib.transformer_inputs(pipe, PROMPT, width=1024, height=1024, batch=1, device=dev)
    reference = lib.forward(pipe, probe)
    r["eager_loop"] = loop_of_forwards(pipe, probe, dev)
    eager = engine_runs(engine, dev)
    print("eager launch", r["eager_loop"], flush=True)

    graphs = TransformerGraphs(pipe.transformer).install()
    engine.transformer_graphs = graphs
    lib.forward(pipe, probe)  # first sight of the probe's shape: eager
    t = time.perf_counter()
    captured = lib.forward(pipe, probe)  # capture + replay
    torch.cuda.synchronize(dev)
    r["capture_s"] = time.perf_counter() - t
    r["graph_vs_eager_forward_rel"] = lib.relative_error(captured, reference)
    r["graph_vs_eager_forward_equal"] = all(
        torch.equal(a, b) for a, b in zip(captured, reference, strict=True)
    )
    r["graph_loop"] = loop_of_forwards(pipe, probe, dev)
    print("graph launch", r["graph_loop"], flush=True)
    replayed = engine_runs(engine, dev)
    r["graphs"] = {"captures": graphs.captures, "replays": graphs.replays, "error": graphs.error}
    for batch in ("1", "4"):
        x = np.asarray(eager.pop(f"image{batch}"), dtype=np.int16)
        y = np.asarray(replayed.pop(f"image{batch}"), dtype=np.int16)
        r[f"image{batch}_max_abs_diff"] = int(np.abs(x - y).max())
    r["engine_eager"], r["engine_graphs"] = eager, replayed
    r["peak_gib"] = lib.peak_gib(dev)
    r["total_s"] = time.perf_counter() - PROCESS_START
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "graph_probe.json").write_text(json.dumps(r, indent=2, default=str))
    print(json.dumps(r, indent=1, default=str))


if __name__ == "__main__":
    main()
