"""Steady-state throughput and GPU busy fraction, as the worker drives the engine.

The worker has one GPU thread that calls ``engine.generate`` request after request and
hands each image to other threads for encoding and upload. ``stream`` does the same: the
calling thread generates back to back, a pool PNG-encodes (the heaviest format), and the
wall time runs from the first request to the last encoded image. A sampler thread reads
NVML's utilisation (share of time a kernel was running) every 20 ms; the engine's own
stage timings give a second, independent figure (time inside generate / wall).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from zimage_pipeline.engine.encode import encode_image
from zimage_pipeline.engine.types import GenerationSpec


class GpuSampler:
    def __init__(self, device: torch.device, period_s: float = 0.02) -> None:
        self.device, self.period_s = device, period_s
        self.samples: list[int] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: str | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(int(torch.cuda.utilization(self.device)))
                self.times.append(time.perf_counter())
            except Exception as exc:  # no NVML bindings: report why, keep the run
                self.error = f"{type(exc).__name__}: {exc}"[:200]
                return
            time.sleep(self.period_s)

    def __enter__(self) -> GpuSampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self, until: float | None = None) -> float | None:
        """Mean utilisation, of samples taken up to ``until`` (perf_counter) if given.
        The first tenth is dropped: NVML averages over its own window (up to 1 s),
        which starts before the stream does."""
        samples = [
            s for s, t in zip(self.samples, self.times, strict=True) if until is None or t <= until
        ]
        tail = samples[len(samples) // 10 :]
        return sum(tail) / len(tail) / 100 if tail else None


def stream(
    engine: Any, *, prompt: str, size: int, steps: int, requests: int, per_request: int
) -> dict[str, Any]:
    """``requests`` requests of ``per_request`` images each, back to back."""
    device = engine.device
    seeds = iter(range(10_000, 10_000 + requests * per_request))
    jobs = [
        [
            GenerationSpec(prompt, seed=next(seeds), width=size, height=size, steps=steps)
            for _ in range(per_request)
        ]
        for _ in range(requests)
    ]
    inside = 0.0
    encoded_bytes = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with ThreadPoolExecutor(max_workers=4) as pool, GpuSampler(device) as sampler:
        start = time.perf_counter()
        futures = []
        for specs in jobs:
            images = engine.generate(specs)
            inside += images[0].timings.total_s
            futures += [pool.submit(encode_image, im.image, format="png") for im in images]
        generated = time.perf_counter()
        encoded_bytes = sum(len(f.result()) for f in futures)
        wall = time.perf_counter() - start
    images_total = requests * per_request
    return {
        "requests": requests,
        "images_per_request": per_request,
        "wall_s": wall,
        "images_per_s": images_total / wall,
        "s_per_image": wall / images_total,
        "encode_tail_s": wall - (generated - start),
        "png_mib": encoded_bytes / 2**20,
        "gpu_busy_nvml": sampler.mean(),
        "steady_images_per_s": images_total / (generated - start),
        "steady_gpu_busy_nvml": sampler.mean(until=generated),
        "nvml_samples": len(sampler.samples),
        "nvml_error": sampler.error,
        "inside_generate_fraction": inside / wall,
        "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30)
        if device.type == "cuda"
        else None,
    }
