"""Round-4 probe (issue 7), one device call: where the last milliseconds go.

1. Clocks: SM clock, power and NVML's clock-event (throttle) reasons sampled every 10 ms
   while a bf16 GEMM runs back to back, and while the engine's compiled forward runs back
   to back at batch 1 and 4, against one isolated forward after an idle pause.
2. The batch-1 request, stage by stage: CUDA events and host clocks around the prompt
   encoding, the denoise call, the VAE decoder, the uint8 conversion, the copy to the
   host and PIL, and the host cost of diffusers' ``_execution_device``.
3. SDPA kernels at batch 4 (cuDNN / flash / memory-efficient).
4. A full-size random-weight model saved to local disk (safetensors, diffusers layout),
   its first-start hashing, then fresh processes through ``load_engine`` (the worker's
   path): GPU mode with the warm compile cache and the page cache dropped (time to first
   image from disk), and ``model_offload`` (the 24 GB-class mode: peak memory, s/image).
5. Inductor options on one compiled transformer block (default, coordinate descent,
   max-autotune-no-cudagraphs) and the VAE decoder with coordinate descent.

    python3 bench/turbo_r4_probe.py --out "$OUT"
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402

from zimage_pipeline.engine.architecture import FULL, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity, identify  # noqa: E402
from zimage_pipeline.engine.optimize import optimize_pipeline, use_compile_cache  # noqa: E402
from zimage_pipeline.engine.types import GenerationSpec  # noqa: E402

PROMPT = (
    "A product photo of a blue ceramic teapot on an oak table, soft window light, "
    "shallow depth of field."
)
SIZE = 1024


class Clocks:
    """NVML samples (SM MHz, W, clock-event reasons bitmask) on a thread, every 10 ms."""

    def __init__(self) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.samples: list[tuple[float, int, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self._reasons = reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        self._thread.start()

    def static(self) -> dict[str, Any]:
        n, h = self.nvml, self.handle
        return {
            "max_sm_mhz": n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM),
            "power_limit_w": n.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            "temperature_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
        }

    def _run(self) -> None:
        n, h = self.nvml, self.handle
        while not self._stop.is_set():
            try:
                self.samples.append(
                    (
                        time.perf_counter(),
                        n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                        n.nvmlDeviceGetPowerUsage(h) / 1000,
                        int(self._reasons(h)),
                    )
                )
            except Exception:  # diagnostics only
                return
            time.sleep(0.01)

    def window(self, start: float, end: float) -> dict[str, Any]:
        rows = [s for s in self.samples if start <= s[0] <= end]
        if not rows:
            return {"samples": 0}
        mask = 0
        for row in rows:
            mask |= row[3]
        return {
            "samples": len(rows),
            "sm_mhz_mean": sum(r[1] for r in rows) / len(rows),
            "sm_mhz_min": min(r[1] for r in rows),
            "power_w_mean": sum(r[2] for r in rows) / len(rows),
            "power_w_max": max(r[2] for r in rows),
            "reasons_mask": hex(mask),
            # 0x4 software power cap, 0x8 hardware slowdown, 0x20/0x40 thermal, 0x80 brake
            "power_cap_share": sum(1 for r in rows if r[3] & 0x4) / len(rows),
            "thermal_share": sum(1 for r in rows if r[3] & 0x60) / len(rows),
        }

    def stop(self) -> None:
        self._stop.set()


def events_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Per-call GPU milliseconds of ``repeats`` back-to-back calls (no sync between)."""
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    marks[0].record()
    for i in range(repeats):
        fn()
        marks[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]


def measured(clocks: Clocks, fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    times = events_ms(fn, repeats)
    window = clocks.window(start, time.perf_counter())
    return {"ms": times, "median_ms": lib.median(times), "clocks": window}


def clock_section(engine: TurboEngine, clocks: Clocks, r: dict[str, Any]) -> None:
    pipe = engine.pipeline
    out: dict[str, Any] = {"static": clocks.static()}
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    time.sleep(2.0)
    gemm = measured(
        clocks, functools.partial(torch.matmul, x, y), 150
    )  # ~1.4 ms each: ~2 s of GEMMs
    gemm["tflops_first10"] = 2 * 8192**3 / (lib.median(gemm["ms"][:10]) / 1e3) / 1e12
    gemm["tflops_last50"] = 2 * 8192**3 / (lib.median(gemm["ms"][-50:]) / 1e3) / 1e12
    out["gemm_8192"] = gemm
    del x, y
    for batch in (1, 4):
        probe = lib.transformer_inputs(
            pipe, PROMPT, width=SIZE, height=SIZE, batch=batch, device=engine.device
        )
        lib.forward(pipe, probe)
        torch.cuda.synchronize()
        time.sleep(2.0)  # idle: clocks back up
        out[f"forward_b{batch}_isolated"] = measured(clocks, lambda: lib.forward(pipe, probe), 1)  # noqa: B023
        out[f"forward_b{batch}_sustained"] = measured(
            clocks,
            lambda: lib.forward(pipe, probe),  # noqa: B023
            16 if batch == 1 else 8,
        )
    r["clocks"] = out


def stage_section(engine: TurboEngine, r: dict[str, Any]) -> None:
    """One batch-1 request taken apart (the engine's _run_batch, with marks)."""
    import numpy as np
    from PIL import Image

    pipe = engine.pipeline
    vae = pipe.vae
    rows = []

    def event() -> Any:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    for rep in range(6):
        batch = [GenerationSpec(PROMPT, seed=40 + rep, width=SIZE, height=SIZE)]
        pinned = rep % 2 == 1  # odd runs: copy into pinned memory, then wait on an event
        torch.cuda.synchronize()
        with torch.inference_mode():
            h = [time.perf_counter()]
            e = [event()]
            caps, neg = engine._encode_prompts(batch)
            e.append(event())
            h.append(time.perf_counter())
            latents = engine._denoise(batch, caps, neg)
            e.append(event())
            h.append(time.perf_counter())
            scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            pixels = vae.decode(scaled, return_dict=False)[0]
            e.append(event())
            h.append(time.perf_counter())
            images = pipe.image_processor._denormalize_conditionally(pixels, None)
            u8 = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            e.append(event())
            h.append(time.perf_counter())
            if pinned:
                host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(u8, non_blocking=True)
                done = event()
                done.synchronize()
                array = host.numpy()
            else:
                array = u8.cpu().numpy()
            h.append(time.perf_counter())
            pil = [Image.fromarray(np.ascontiguousarray(x)) for x in array]
            h.append(time.perf_counter())
            pipe.maybe_free_model_hooks()
            h.append(time.perf_counter())
        gpu = [a.elapsed_time(b) for a, b in itertools.pairwise(e)]
        host_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(h)]
        total = (h[-1] - h[0]) * 1e3
        rows.append(
            {
                "pinned_copy": pinned,
                "gpu_ms": dict(
                    zip(["encode", "denoise", "vae_decoder", "to_uint8"], gpu, strict=True)
                ),
                "host_ms": dict(
                    zip(
                        [
                            "encode",
                            "denoise_call",
                            "vae_enqueue",
                            "uint8_enqueue",
                            "wait_and_copy",
                            "pil",
                            "free_hooks",
                        ],
                        host_ms,
                        strict=True,
                    )
                ),
                "total_ms": total,
                "decode_stage_ms": total - gpu[0] - gpu[1],
                "pil_size": pil[0].size,
            }
        )
    samples = []
    for _ in range(20):
        t = time.perf_counter()
        pipe._execution_device  # noqa: B018  (the property's cost is the point)
        samples.append((time.perf_counter() - t) * 1e3)
    engine_runs = []
    for rep in range(3):
        spec = [GenerationSpec(PROMPT, seed=60 + rep, width=SIZE, height=SIZE)]
        seconds, images = lib.timed(lambda: engine.generate(spec), engine.device)  # noqa: B023
        t = images[0].timings
        engine_runs.append([seconds, t.encode_prompt_s, t.denoise_s, t.decode_s])
    r["stages_batch1"] = {
        "runs": rows,
        "execution_device_ms": lib.median(samples),
        "engine_generate_s": engine_runs,
    }


def sdpa_section(r: dict[str, Any]) -> None:
    import torch.nn.functional as F  # noqa: N812
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}
    for batch in (1, 4):
        shape = (batch, 30, 4224, 128)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * 30 * 4224**2 * 128
        for name, backend in (
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):
            try:
                with sdpa_kernel(backend):
                    ms = lib.median(
                        events_ms(lambda: F.scaled_dot_product_attention(q, k, v), 20)[5:]  # noqa: B023
                    )
                out[f"b{batch}_{name}"] = {"ms": ms, "tflops": flops / ms / 1e9}
            except RuntimeError as exc:
                out[f"b{batch}_{name}"] = {"error": str(exc)[:200]}
    r["sdpa"] = out


def disk_section(a: argparse.Namespace, r: dict[str, Any]) -> None:
    """Fresh processes on the saved model, through load_engine."""
    script = Path(__file__).with_name("turbo_first_image.py")
    out: dict[str, Any] = {}
    r["disk"] = out
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        out["page_cache_dropped"] = True
    except OSError as exc:
        out["page_cache_dropped"] = f"no: {exc}"
    if a.raw_read:  # the disk's own speed: every model file read once, then forgotten
        t = time.perf_counter()
        subprocess.run(
            ["sh", "-c", f"find {a.model_dir} -type f -exec cat {{}} + > /dev/null"], check=False
        )
        out["raw_read_s"] = time.perf_counter() - t
        out["raw_read_gib_s"] = r.get("saved", {}).get("gib", 0) / out["raw_read_s"]
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    cases = [
        ("gpu_warm_cache", ["--memory-mode", "gpu", "--requests", "1,1"]),
        ("model_offload", ["--memory-mode", "model_offload", "--requests", "1,1,4"]),
    ]
    for name, extra in cases:
        if name not in a.disk_cases.split(","):
            continue
        if time.perf_counter() - PROCESS_START > a.budget_s - 100:
            out[name] = {"skipped": "time budget"}
            continue
        target = a.out / f"{name}.json"
        command = [sys.executable, str(script), "--cache", a.cache_dir, "--model", a.model_dir]
        command += ["--out", str(target), *extra]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=200, check=False)
            out[name] = (
                json.loads(target.read_text())
                if target.is_file()
                else {"rc": done.returncode, "stderr": done.stderr[-1500:]}
            )
        except subprocess.TimeoutExpired:
            out[name] = {"error": "past 200 s"}
        out[name]["wall_s"] = time.perf_counter() - started
        lib.write_json(r, a.out / "probe.json")


def block_section(engine: TurboEngine, a: argparse.Namespace, r: dict[str, Any]) -> None:
    """Compiled block (main layer 0, real inputs) under inductor options, static shapes."""
    pipe = engine.pipeline
    transformer = pipe.transformer
    block = transformer.layers[0]
    captured: dict[int, tuple[Any, Any]] = {}

    def hook(_module: Any, args: Any, kwargs: Any) -> None:
        captured[args[0].shape[0]] = (args, kwargs)

    # The hook must run outside the compiled block (a Python side effect in a fullgraph).
    compiled_call, block._compiled_call_impl = block._compiled_call_impl, None
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in (1, 4):
            probe = lib.transformer_inputs(
                pipe, PROMPT, width=SIZE, height=SIZE, batch=batch, device=engine.device
            )
            lib.forward(pipe, probe)
    finally:
        handle.remove()
        block._compiled_call_impl = compiled_call
    forward = type(block).forward
    out: dict[str, Any] = {}
    r["block"] = out
    configs: list[tuple[str, dict[str, Any]]] = [
        ("default", {}),
        ("coordinate_descent", {"options": {"coordinate_descent_tuning": True}}),
        ("max_autotune_no_cudagraphs", {"mode": "max-autotune-no-cudagraphs"}),
    ]
    margin = {"max_autotune_no_cudagraphs": 170}  # its GEMM autotuning compiles for minutes
    reference: dict[int, Any] = {}
    for name, options in configs:
        if name not in a.block_configs.split(","):
            continue
        if time.perf_counter() - PROCESS_START > a.budget_s - margin.get(name, 60):
            out[name] = {"skipped": "time budget"}
            continue
        torch._dynamo.reset()
        fn = torch.compile(
            lambda *args, **kw: forward(block, *args, **kw),
            fullgraph=True,
            dynamic=False,
            **options,
        )
        row: dict[str, Any] = {}
        for batch, (args, kwargs) in captured.items():
            with torch.inference_mode():
                t = time.perf_counter()
                result = fn(*args, **kwargs)
                torch.cuda.synchronize()
                row[f"b{batch}_compile_s"] = time.perf_counter() - t
                times = events_ms(lambda: fn(*args, **kwargs), 40)[10:]  # noqa: B023
            row[f"b{batch}_ms"] = lib.median(times)
            if name == "default":
                reference[batch] = result
            else:
                row[f"b{batch}_rel_err_vs_default"] = lib.relative_error(
                    [result], [reference[batch]]
                )
        out[name] = row
        lib.write_json(r, a.out / "probe.json")
    # The VAE decoder, default vs coordinate descent (batch 1, 10 decodes back to back).
    vae = pipe.vae
    latents = torch.randn(1, 16, SIZE // 8, SIZE // 8, device="cuda", dtype=vae.dtype)
    dec: dict[str, Any] = {}
    for name, options in (
        ("default", {}),
        ("coordinate_descent", {"coordinate_descent_tuning": True}),
    ):
        if time.perf_counter() - PROCESS_START > a.budget_s - 30:
            dec[name] = {"skipped": "time budget"}
            continue
        torch._dynamo.reset()
        vae.decoder._compiled_call_impl = None
        vae.decoder.compile(**({"options": options} if options else {}))
        with torch.inference_mode():
            t = time.perf_counter()
            image = vae.decode(latents, return_dict=False)[0]
            torch.cuda.synchronize()
            dec[f"{name}_compile_s"] = time.perf_counter() - t
            times = events_ms(lambda: vae.decode(latents, return_dict=False), 12)[2:]
        dec[f"{name}_ms"] = lib.median(times)
        if name == "default":
            reference[0] = image
        else:
            dec[f"{name}_rel_err_vs_default"] = lib.relative_error([image], [reference[0]])
    r["vae_decoder"] = dec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--skip", default="", help="sections to skip: clocks,stages,sdpa,disk,block")
    p.add_argument("--disk-cases", default="gpu_warm_cache,model_offload")
    p.add_argument("--raw-read", action="store_true", help="time a plain read of the model")
    p.add_argument(
        "--block-configs", default="default,coordinate_descent,max_autotune_no_cudagraphs"
    )
    a = p.parse_args()
    skip = set(a.skip.split(","))
    a.cache_dir = tempfile.mkdtemp(prefix="zimage-compile-cache-")
    use_compile_cache(a.cache_dir)
    dev = torch.device("cuda")
    r: dict[str, Any] = {"env": lib.device_info(dev), "notes": []}
    clocks = Clocks()
    t = time.perf_counter()
    pipe = build_random_pipeline(FULL, seed=0, dtype=torch.bfloat16, device=dev)
    pipe.set_progress_bar_config(disable=True)
    r["build_s"] = time.perf_counter() - t
    a.model_dir = tempfile.mkdtemp(prefix="zimage-full-")
    if "disk" not in skip:
        t = time.perf_counter()
        pipe.save_pretrained(a.model_dir, safe_serialization=True)
        os.sync()
        r["save_s"] = time.perf_counter() - t
        files = [f for f in Path(a.model_dir).rglob("*") if f.is_file()]
        r["saved"] = {
            "gib": sum(f.stat().st_size for f in files) / 2**30,
            "files": sorted(str(f.relative_to(a.model_dir)) for f in files),
        }
        t = time.perf_counter()  # a worker's first start hashes every file once
        identify(Path(a.model_dir), name="full-random", revision=None, source="local")
        r["first_start_hash_s"] = time.perf_counter() - t
    lib.write_json(r, a.out / "probe.json")
    config = EngineConfig(model_path="(in memory)", device="cuda", compile=True)
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    engine = TurboEngine(pipe, config=config, device=dev, identity=identity)
    engine.compiled = optimize_pipeline(pipe, config=config, device=dev)
    r["warmup_cold_s"] = engine.warmup(width=SIZE, height=SIZE)
    lib.write_json(r, a.out / "probe.json")
    sections: list[tuple[str, Callable[[], None]]] = [
        ("clocks", lambda: clock_section(engine, clocks, r)),
        ("stages", lambda: stage_section(engine, r)),
        ("sdpa", lambda: sdpa_section(r)),
        ("disk", lambda: disk_section(a, r)),
        ("block", lambda: block_section(engine, a, r)),
    ]
    for name, run in sections:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            if name == "disk":
                torch.cuda.empty_cache()
            run()
        except Exception as exc:  # keep the other sections
            r["notes"].append(f"{name} failed: {type(exc).__name__}: {exc}"[:600])
        r[f"{name}_section_s"] = time.perf_counter() - t
        lib.write_json(r, a.out / "probe.json")
        print(f"{name} done at {time.perf_counter() - PROCESS_START:.0f}s", flush=True)
    clocks.stop()
    shutil.rmtree(a.model_dir, ignore_errors=True)
    r["total_s"] = time.perf_counter() - PROCESS_START
    lib.write_json(r, a.out / "probe.json")
    print(json.dumps({k: v for k, v in r.items() if k != "env"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
