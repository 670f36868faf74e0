"""Round-3 probe (issue 7): cheap, eager-only measurements that decide what the full
benchmark runs. One process, about a minute of GPU time after the model is built:

1. cuBLAS GEMMs of a transformer block: q, k, v (and w1, w3) separately vs fused.
2. The text encoder: diffusers' eager encode_prompt vs the engine's PromptEncoder with
   CUDA graphs (exact length and bucketed), time and relative error.
3. The VAE decoder, eager: NCHW vs channels-last, kernel breakdown.
4. The transformer's eager forward, unfused vs fused projections, kernel breakdown.

    python bench/turbo_probe.py --out "$OUT"
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402

from zimage_pipeline.engine.architecture import FULL, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.fusion import fuse_projections  # noqa: E402
from zimage_pipeline.engine.prompts import PromptEncoder, token_ids  # noqa: E402

PROMPT = (
    "A product photo of a blue ceramic teapot on an oak table, soft window light, "
    "shallow depth of field."
)


def cuda_time(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return lib.median(times)


def wall_time(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median host seconds per call, synchronised (launch-bound work needs the wall)."""
    for _ in range(warmup):
        fn()
    dev = torch.device("cuda")
    return lib.median([lib.timed(fn, dev)[0] for _ in range(repeats)])


def gemm_row(m: int, g: torch.Generator) -> dict[str, Any]:
    """One block's GEMMs at M tokens (4224 = one 1024x1024 image with its caption)."""
    dim, hidden = 3840, 10240

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * scale

    x, h = rand(m, dim), rand(m, hidden)
    q, k, v = rand(dim, dim, scale=0.02), rand(dim, dim, scale=0.02), rand(dim, dim, scale=0.02)
    w1, w3, w2 = rand(hidden, dim, scale=0.02), rand(hidden, dim, scale=0.02), rand(dim, hidden)
    qkv, w13 = torch.cat([q, k, v]), torch.cat([w1, w3])
    linear = torch.nn.functional.linear
    cases: dict[str, tuple[Callable[[], Any], int, int]] = {
        "qkv_separate": (lambda: [linear(x, w) for w in (q, k, v)], 3 * dim, dim),
        "qkv_fused": (lambda: linear(x, qkv), 3 * dim, dim),
        "w1w3_separate": (lambda: [linear(x, w) for w in (w1, w3)], 2 * hidden, dim),
        "w13_fused": (lambda: linear(x, w13), 2 * hidden, dim),
        "w2": (lambda: linear(h, w2), dim, hidden),
    }
    row = {}
    for name, (fn, n, k_dim) in cases.items():
        s = cuda_time(fn, repeats=30)
        row[name] = {"ms": s * 1e3, "tflops": 2 * m * n * k_dim / s / 1e12}
    return row


def gemms() -> dict[str, Any]:
    g = torch.Generator("cuda").manual_seed(0)
    return {str(m): gemm_row(m, g) for m in (4224, 4 * 4224)}


def text_encoder(pipe: Any, dev: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = len(token_ids(pipe.tokenizer, PROMPT))
    out["tokens"] = n

    def eager(length: int) -> Any:
        caps, _ = pipe.encode_prompt(
            prompt=[PROMPT],
            device=dev,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
        return caps

    with torch.inference_mode():
        reference = eager(n)
        out["eager_unpadded_s"] = wall_time(lambda: eager(n))
        out["eager_512_s"] = wall_time(lambda: eager(512))
        out["eager_512_vs_unpadded_rel"] = lib.relative_error(eager(512), reference)
        for bucket in (1, 32, 64):
            for graphs in (False, True):
                encoder = PromptEncoder(pipe, dev, bucket=bucket, graphs=graphs)
                t0 = time.perf_counter()
                first = encoder.encode([PROMPT])
                torch.cuda.synchronize()
                row = {
                    "first_call_s": time.perf_counter() - t0,
                    "s": wall_time(lambda e=encoder: e.encode([PROMPT])),  # type: ignore[misc]
                    "rel_vs_eager_unpadded": lib.relative_error(first, reference),
                    "graphs": encoder.graph_count,
                    "graph_error": encoder.graph_error,
                }
                row["s_batch4_same_prompt"] = wall_time(
                    lambda e=encoder: e.encode([PROMPT] * 4)  # type: ignore[misc]
                )
                out[f"bucket{bucket}_{'graph' if graphs else 'eager'}"] = row
                print("text", bucket, graphs, row, flush=True)
    return out


def top_kernels(fn: Callable[[], Any], limit: int = 18) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total > 0:
            rows.append({"name": e.key[:110], "calls": e.count, "ms": total / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:limit]


def vae(pipe: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    decoder = pipe.vae.decoder
    g = torch.Generator("cuda").manual_seed(1)
    with torch.inference_mode():
        for batch in (1, 4):
            z = torch.randn(batch, 16, 128, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            decoder.to(memory_format=torch.contiguous_format)
            ref = decoder(z)
            nchw = cuda_time(lambda z=z: decoder(z), repeats=5, warmup=1)  # type: ignore[misc]
            if batch == 1:
                out["kernels_nchw"] = top_kernels(lambda z=z: decoder(z))  # type: ignore[misc]
            decoder.to(memory_format=torch.channels_last)
            zc = z.contiguous(memory_format=torch.channels_last)
            nhwc_out = decoder(zc)
            nhwc = cuda_time(lambda zc=zc: decoder(zc), repeats=5, warmup=1)  # type: ignore[misc]
            if batch == 1:
                out["kernels_nhwc"] = top_kernels(lambda zc=zc: decoder(zc))  # type: ignore[misc]
            out[str(batch)] = {
                "nchw_s": nchw,
                "nhwc_s": nhwc,
                "rel_nhwc_vs_nchw": lib.relative_error([nhwc_out], [ref]),
            }
            print("vae", batch, out[str(batch)], flush=True)
        decoder.to(memory_format=torch.contiguous_format)
    return out


def transformer(pipe: Any, dev: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    probe = lib.transformer_inputs(pipe, PROMPT, width=1024, height=1024, batch=1, device=dev)
    ref = lib.forward(pipe, probe)
    out["unfused_s"] = cuda_time(lambda: lib.forward(pipe, probe), repeats=5, warmup=1)
    out["kernels_unfused"] = top_kernels(lambda: lib.forward(pipe, probe), limit=25)
    fuse_projections(pipe.transformer)
    torch.cuda.empty_cache()
    fused = lib.forward(pipe, probe)
    out["fused_s"] = cuda_time(lambda: lib.forward(pipe, probe), repeats=5, warmup=1)
    out["kernels_fused"] = top_kernels(lambda: lib.forward(pipe, probe), limit=25)
    out["rel_fused_vs_unfused"] = lib.relative_error(fused, ref)
    print("transformer", {k: v for k, v in out.items() if "kernels" not in k}, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    a = p.parse_args()
    dev = torch.device("cuda")
    r: dict[str, Any] = {
        "env": lib.device_info(dev),
        "import_s": time.perf_counter() - PROCESS_START,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    target = a.out / "probe.json"

    def save() -> None:
        target.write_text(json.dumps(r, indent=2, default=str))

    r["gemms"] = gemms()
    print("gemms", json.dumps(r["gemms"]), flush=True)
    save()
    t = time.perf_counter()
    pipe = build_random_pipeline(FULL, seed=0, dtype=torch.bfloat16, device=dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.config.use_cache = False  # as the engine does
    r["build_s"] = time.perf_counter() - t
    for name, fn in (
        ("text_encoder", lambda: text_encoder(pipe, dev)),
        ("vae", lambda: vae(pipe)),
        ("transformer", lambda: transformer(pipe, dev)),
    ):
        try:
            r[name] = fn()
        except Exception as exc:  # keep the other parts
            r[name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            print(name, "failed", exc, flush=True)
        save()
    r["total_s"] = time.perf_counter() - PROCESS_START
    save()
    print(json.dumps({k: v for k, v in r.items() if k not in ("vae", "transformer")}, indent=1))


if __name__ == "__main__":
    main()
