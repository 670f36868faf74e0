"""Z-Image-Turbo: plain diffusers (eager reference) against the project's TurboEngine.

One process, one run: builds the full-size architecture with random weights on the GPU
(or the tiny one on the CPU with --tiny), times the eager ZImagePipeline call exactly as
diffusers documents it, then wraps the same pipeline in TurboEngine (the code path the
worker uses) for each engine variant (VARIANTS), and writes results.json and summary.md.
The first variant also runs a stream of requests (throughput, GPU busy fraction) and
fresh processes through ``load_engine`` on a copy of the model saved to local disk at the
start (safetensors, the real checkpoint's layout): one on the compile cache the first
variant filled, with the page cache dropped (time to first image on a warm cache, weights
read from disk), and one in ``model_offload`` mode (the 24 GB-class mode). The ``fp8``
variant is the lossy opt-in tier: its errors are reported, the lossless checks are not
expected to pass, and it runs last.

    python bench/turbo_bench.py --out "$OUT"            # GPU, full size, 1024x1024
    python bench/turbo_bench.py --tiny --out /tmp/b     # CPU, tiny model, end to end
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402
import turbo_stream  # noqa: E402

from zimage_pipeline.engine.architecture import FULL, TINY, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity  # noqa: E402
from zimage_pipeline.engine.optimize import (  # noqa: E402
    attention_priority,
    optimize_pipeline,
    use_compile_cache,
)
from zimage_pipeline.engine.prompts import token_ids  # noqa: E402
from zimage_pipeline.engine.types import GenerationSpec  # noqa: E402

VARIANTS = lib.VARIANTS

# About 110 tokens with the byte-level bench tokenizer: a long-ish real prompt's length.
PROMPT = (
    "A product photo of a blue ceramic teapot on an oak table, soft window light, "
    "shallow depth of field."
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    p.add_argument(
        "--variants",
        default="opt,fp8",
        help=f"engine variants: {', '.join(VARIANTS)} (fp8 last)",
    )
    p.add_argument("--no-disk", action="store_true", help="no saved model, no restarts from disk")
    p.add_argument("--offload-after-s", type=float, default=400.0, help="no offload run after")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no variant after this")
    p.add_argument("--stream-requests", type=int, default=12, help="batch-1 requests in the stream")
    p.add_argument("--no-first-image", action="store_true", help="skip the warm-cache restart")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    return p.parse_args()


def eager_phase(pipe: Any, r: dict[str, Any], a: argparse.Namespace, dev: torch.device) -> Any:
    """The reference: ZImagePipeline.__call__ with diffusers' defaults (512-token padding,
    native attention, no compile), CPU generators as the engine uses."""

    def call(batch: int, seed: int) -> Any:
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        return pipe(
            prompt=[PROMPT] * batch,
            height=a.size,
            width=a.size,
            num_inference_steps=a.steps,
            guidance_scale=0.0,
            generator=gens,
        ).images

    path: dict[str, Any] = {"runs": {}}
    first_s, _ = lib.timed(lambda: call(1, 1000), dev)
    path["time_to_first_image_s"] = r["build_s"] + first_s
    reference = None
    for batch, repeats in ((1, 3), (4, 2)):
        if batch > 1:
            call(batch, 2000)  # first call at a new batch size is not timed
        lib.reset_peak(dev)
        times = []
        for rep in range(repeats):
            seconds, images = lib.timed(lambda: call(batch, 1 + rep), dev)  # noqa: B023
            times.append(seconds)
            if batch == 1 and rep == 0:
                reference = images[0]
            if batch == 4 and rep == 0:  # seed 1 again, in a batch: eager's own bf16 noise
                path["batch_vs_single"] = lib.image_difference(images[0], reference)
        path["runs"][str(batch)] = _run_stats(times, batch, r, a, lib.peak_gib(dev))
    r["paths"]["eager"] = path
    return reference


def _run_stats(
    times: list[float],
    batch: int,
    r: dict[str, Any],
    a: argparse.Namespace,
    peak: float | None,
    denoise: list[float] | None = None,
) -> dict[str, Any]:
    s_img = lib.median(times) / batch
    stats: dict[str, Any] = {
        "times_s": times,
        "s_per_image": s_img,
        "images_per_s": 1 / s_img,
        "peak_gib": peak,
    }
    if denoise:
        per_forward = lib.median(denoise) / a.steps
        stats["s_per_forward"] = per_forward
        stats["tflops"] = r["flops_per_forward"] * batch / per_forward / 1e12
    return stats


def engine_phase(
    pipe: Any,
    variant: str,
    r: dict[str, Any],
    a: argparse.Namespace,
    dev: torch.device,
    probe: Any,
    probe_ref: Any,
    reference_image: Any,
    first_variant: bool,
) -> None:
    torch._dynamo.reset()
    lib.undo_optimizations(pipe)
    config = EngineConfig(
        model_path="(in memory)",
        device=str(dev),
        max_batch=4,
        default_steps=a.steps,
        compile=True,
        **VARIANTS[variant],
    )
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    engine = TurboEngine(pipe, config=config, device=dev, identity=identity)
    one = [GenerationSpec(PROMPT, seed=1, width=a.size, height=a.size, steps=a.steps)]
    with torch.inference_mode():  # diffusers' eager embeddings at the unpadded length
        eager_caps, _ = pipe.encode_prompt(
            prompt=[PROMPT],
            device=dev,
            do_classifier_free_guidance=False,
            max_sequence_length=len(token_ids(pipe.tokenizer, PROMPT)),
        )
    engine.compiled = optimize_pipeline(pipe, config=config, device=dev)
    path: dict[str, Any] = {"runs": {}}
    r["paths"][f"engine[{variant}]"] = path
    path["warmup_s"] = engine.warmup(width=a.size, height=a.size)

    def specs(batch: int, seed: int) -> list[GenerationSpec]:
        return [
            GenerationSpec(PROMPT, seed=seed + i, width=a.size, height=a.size, steps=a.steps)
            for i in range(batch)
        ]

    first_s, first = lib.timed(lambda: engine.generate(specs(1, 1)), dev)
    path["time_to_first_image_s"] = r["build_s"] + path["warmup_s"] + first_s
    path["image_vs_eager"] = lib.image_difference(first[0].image, reference_image)
    with attention_priority(config.attention_backend, dev):
        path["forward_rel_err"] = lib.relative_error(lib.forward(pipe, probe), probe_ref)
        with torch.inference_mode():
            caps, _ = engine._encode_prompts(one)
        path["prompt_embeds_rel_err"] = lib.relative_error(caps, eager_caps)
        path["prompt_embeds_rel_err_vs_512_padded"] = lib.relative_error(caps, probe[2])
    singles: dict[int, Any] = {}
    for batch, repeats in ((1, 3), (2, 2), (4, 2)):
        engine.generate(specs(batch, 500))  # untimed first call at this batch size
        lib.reset_peak(dev)
        times, denoise, stages = [], [], []
        for rep in range(repeats):
            seconds, images = lib.timed(lambda: engine.generate(specs(batch, 10 + 10 * rep)), dev)  # noqa: B023
            times.append(seconds)
            denoise.append(images[0].timings.denoise_s)
            stages.append(images[0].timings)
            if batch == 1:
                singles[images[0].seed] = images[0].image
            elif batch == 4 and rep == 0:
                path["batch_vs_single"] = lib.image_difference(images[0].image, singles[10])
        stats = _run_stats(times, batch, r, a, lib.peak_gib(dev), denoise)
        stats["stages_s"] = {
            k: lib.median([getattr(s, k) for s in stages])
            for k in ("encode_prompt_s", "denoise_s", "decode_s")
        }
        path["runs"][str(batch)] = stats
    if engine.prompt_encoder is not None:
        path["prompt_encoder"] = {
            "cuda_graphs": engine.prompt_encoder.graph_count,
            "graph_error": engine.prompt_encoder.graph_error,
            "bucket": engine.prompt_encoder.bucket,
        }
    if first_variant and dev.type == "cuda":
        try:
            path["profile"] = profiles(engine, pipe, probe, a, dev)
        except Exception as exc:  # diagnostics only: keep the stream and the restart
            path["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        lib.write_report(r, a.out)
    if first_variant:
        stream_and_restart(engine, path, r, a)
    path["lossless"] = lib.lossless(path, r["paths"]["eager"])


def profiles(engine: Any, pipe: Any, probe: Any, a: Any, dev: torch.device) -> dict[str, Any]:
    """Where the GPU time goes (kernel names, for the next round): one compiled forward,
    one VAE decode, one whole batch-1 request (kernel time over its wall time)."""
    out: dict[str, Any] = {}
    spec = [GenerationSpec(PROMPT, seed=3, width=a.size, height=a.size, steps=a.steps)]
    latents = torch.randn(1, 16, a.size // 8, a.size // 8, device=dev, dtype=pipe.vae.dtype)
    cases = {
        "forward_batch1": lambda: lib.forward(pipe, probe),
        "vae_decode_batch1": lambda: pipe.vae.decode(latents, return_dict=False),
        "request_batch1": lambda: engine.generate(spec),
    }
    with attention_priority(engine.config.attention_backend, dev):
        for name, fn in cases.items():
            try:
                with torch.inference_mode():
                    out[name] = lib.top_kernels(fn)
            except Exception as exc:  # a profiler problem must not lose the run
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        # A lead for the VAE: cuDNN's measured algorithm choice instead of its heuristic
        # (the compiled decoder calls cuDNN for its convolutions).
        with torch.inference_mode():
            decode = cases["vae_decode_batch1"]
            heuristic = lib.time_call(decode, dev)
            torch.backends.cudnn.benchmark = True
            try:
                measured = lib.time_call(decode, dev)
            finally:
                torch.backends.cudnn.benchmark = False
        out["vae_decode_s"] = {"cudnn_heuristic": heuristic, "cudnn_benchmark": measured}
    return out


def stream_and_restart(engine: Any, path: dict[str, Any], r: dict[str, Any], a: Any) -> None:
    """The steady stream (batch 1 and batch 4 requests), then a fresh process on the
    compile cache this one filled."""
    path["stream"] = {
        "batch1": turbo_stream.stream(
            engine,
            prompt=PROMPT,
            size=a.size,
            steps=a.steps,
            requests=a.stream_requests,
            per_request=1,
        ),
        "batch4": turbo_stream.stream(
            engine,
            prompt=PROMPT,
            size=a.size,
            steps=a.steps,
            requests=max(2, a.stream_requests // 4),
            per_request=4,
        ),
    }
    lib.write_report(r, a.out)
    if a.no_first_image:
        return
    if engine.device.type == "cuda":  # room for the second process's copy of the model
        torch.cuda.empty_cache()
    path["first_image_warm_cache"] = fresh_process(a, r, "first_image_warm", ["--requests", "1,1"])
    lib.write_report(r, a.out)
    if a.model_dir and time.perf_counter() - PROCESS_START < a.offload_after_s:
        extra = ["--memory-mode", "model_offload", "--requests", "4"]
        path["model_offload"] = fresh_process(a, r, "model_offload", extra)


def fresh_process(a: Any, r: dict[str, Any], name: str, extra: list[str]) -> dict[str, Any]:
    """turbo_first_image.py on the compile cache this process filled; with a saved model,
    through load_engine with the page cache dropped (the weights come from the disk)."""
    target = a.out / f"{name}.json"
    command = [
        sys.executable,
        str(Path(__file__).with_name("turbo_first_image.py")),
        "--cache",
        a.cache_dir,
        "--out",
        str(target),
        "--size",
        str(a.size),
        *extra,
    ]
    if a.tiny:
        command.append("--tiny")
    if a.model_dir:
        command += ["--model", a.model_dir]
        if not a.tiny:  # the device machine only: never the page cache of a shared host
            drop_page_cache(r)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
        if target.is_file():
            return dict(json.loads(target.read_text()))
        r["notes"].append(f"{name} failed (rc {done.returncode}): {done.stderr[-400:]}")
    except subprocess.TimeoutExpired:
        r["notes"].append(f"{name} ran past 240 s")
    return {}


def drop_page_cache(r: dict[str, Any]) -> None:
    """So that the fresh process reads the weights from the disk, not from memory."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        r.setdefault("disk", {})["page_cache_dropped"] = True
    except OSError as exc:  # not root, or no such file: the number is then page-cache warm
        r.setdefault("disk", {})["page_cache_dropped"] = f"no: {exc}"


def save_model(pipe: Any, a: Any, r: dict[str, Any]) -> None:
    """The model as a worker finds it on disk (before any engine rewrites its modules),
    and the first start's hashing of it (later starts reuse the digests)."""
    from zimage_pipeline.engine.identity import identify

    a.model_dir = tempfile.mkdtemp(prefix="zimage-model-")
    disk = r.setdefault("disk", {})
    start = time.perf_counter()
    pipe.save_pretrained(a.model_dir, safe_serialization=True)
    os.sync()
    disk["save_s"] = time.perf_counter() - start
    files = [f for f in Path(a.model_dir).rglob("*") if f.is_file()]
    disk["gib"] = sum(f.stat().st_size for f in files) / 2**30
    disk["files"] = len(files)
    start = time.perf_counter()
    identify(Path(a.model_dir), name="saved", revision=None, source="local")
    disk["first_start_hash_s"] = time.perf_counter() - start


def speedups(r: dict[str, Any]) -> None:
    eager = r["paths"]["eager"]["runs"]
    best_eager = min(run["s_per_image"] for run in eager.values())
    for name, path in r["paths"].items():
        if name == "eager" or not path.get("runs"):
            continue
        runs = path["runs"]
        r["speedup"][f"{name} batch 1 vs eager batch 1"] = (
            eager["1"]["s_per_image"] / runs["1"]["s_per_image"]
        )
        best = min(run["s_per_image"] for run in runs.values())
        r["speedup"][f"{name} best batch vs eager best batch"] = best_eager / best


def main() -> None:
    a = parse()
    variants = a.variants.split(",")
    if "fp8" in variants[:-1]:
        raise SystemExit("--variants: fp8 must come last (its FP8 layers are not undone)")
    # A fresh on-disk compile cache: the first variant compiles cold and fills it, the
    # restart in stream_and_restart reads it warm. Set before anything compiles.
    a.cache_dir = tempfile.mkdtemp(prefix="zimage-compile-cache-")
    use_compile_cache(a.cache_dir)
    dev = torch.device("cpu" if a.tiny else "cuda")
    a.size = a.size or (256 if a.tiny else 1024)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    r: dict[str, Any] = {"env": lib.device_info(dev), "paths": {}, "speedup": {}, "notes": []}
    r["import_s"] = time.perf_counter() - PROCESS_START
    r["build_s"], pipe = lib.timed(
        lambda: build_random_pipeline(TINY if a.tiny else FULL, seed=0, dtype=dtype, device=dev),
        dev,
    )
    pipe.set_progress_bar_config(disable=True)
    r["build_s"] += r["import_s"]
    a.model_dir = None
    if not a.no_disk:
        save_model(pipe, a, r)
    probe = lib.transformer_inputs(pipe, PROMPT, width=a.size, height=a.size, batch=1, device=dev)
    r["config"] = {
        "architecture": "tiny" if a.tiny else "full-size (6.15B DiT, Qwen3-4B, Flux VAE)",
        "width": a.size,
        "height": a.size,
        "steps": a.steps,
        "caption_tokens": int(probe[2][0].shape[0]),
        "dtype": str(dtype),
    }
    r["flops_per_forward"] = lib.count_flops(pipe, probe)
    probe_ref = lib.forward(pipe, probe)
    eager_forward = lib.time_forward(pipe, probe, dev)
    r["eager_forward_s"] = eager_forward
    r["eager_forward_tflops"] = r["flops_per_forward"] / eager_forward / 1e12
    lib.write_report(r, a.out)
    reference_image = eager_phase(pipe, r, a, dev)
    print(f"eager done at {time.perf_counter() - PROCESS_START:.0f}s", flush=True)
    lib.write_report(r, a.out)
    for number, variant in enumerate(variants):
        if time.perf_counter() - PROCESS_START > a.budget_s:
            r["notes"].append(f"engine[{variant}] skipped: time budget spent")
            continue
        try:
            engine_phase(pipe, variant, r, a, dev, probe, probe_ref, reference_image, number == 0)
        except Exception as exc:  # keep what was measured so far
            r["notes"].append(f"engine[{variant}] failed: {type(exc).__name__}: {exc}"[:500])
        speedups(r)
        lib.write_report(r, a.out)
        print(f"engine[{variant}] done at {time.perf_counter() - PROCESS_START:.0f}s", flush=True)
    if a.model_dir:
        shutil.rmtree(a.model_dir, ignore_errors=True)
    r["total_s"] = time.perf_counter() - PROCESS_START
    lib.write_report(r, a.out)
    print(lib.markdown(r))


if __name__ == "__main__":
    main()
