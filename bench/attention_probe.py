"""Which SDPA kernel runs for Z-Image's attention shape, and how fast: flash, cuDNN and
memory-efficient, eager and under torch.compile with the engine's cuDNN priority.

Why: turbo_bench.py measured engine[sdpa] and engine[sdpa_cudnn] identical to the
microsecond. This tells whether cuDNN is faster at all and whether the priority reaches
compiled graphs.

    python3 bench/attention_probe.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPE = (1, 30, 4224, 128)  # batch, heads, 4096 image + 128 caption tokens, head dim


def time_ms(fn: Any, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernels(fn: Any) -> list[str]:
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(n[:90] for n in names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    out = parser.parse_args().out
    q, k, v = (torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] ** 2 * SHAPE[3]
    result: dict[str, Any] = {"shape": SHAPE, "gflop": flops / 1e9, "eager": {}}
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                out_ = F.scaled_dot_product_attention(q, k, v)
            err = float((out_.float() - ref).norm() / ref.norm())
            result["eager"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err": err}
        except RuntimeError as exc:
            result["eager"][name] = {"error": str(exc)[:200]}
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    compiled = torch.compile(lambda a, b, c: F.scaled_dot_product_attention(a, b, c) * 1.0)
    with sdpa_kernel(order, set_priority=True):
        result["eager_priority_kernels"] = kernels(lambda: F.scaled_dot_product_attention(q, k, v))
        result["compiled_priority_kernels"] = kernels(lambda: compiled(q, k, v))
        result["compiled_priority_ms"] = time_ms(lambda: compiled(q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: F.scaled_dot_product_attention(a, b, c) * 1.0)
    result["compiled_default_kernels"] = kernels(lambda: compiled(q, k, v))
    result["compiled_default_ms"] = time_ms(lambda: compiled(q, k, v))
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_probe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
