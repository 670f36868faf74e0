"""LoRA style adapters (issue 17): what a switch costs on the compiled engine, whether it
recompiles, and the steady throughput with two alternating adapters against none.

Builds the full-size architecture with random weights on the GPU (or the tiny one on the
CPU with --tiny), writes random LoRA files of a realistic rank (--rank, 32) for every
attention and feed-forward projection of the transformer's blocks, as a trainer would
target them, and runs the project's TurboEngine with them in its catalogue
(engine/adapters.py: fixed slots of rank --slot-rank, compiled once):

1. warmup (the engine's own: compiles LoRA disabled and enabled);
2. switch cost, measured around ``AdapterSlots.activate`` with the device synchronised:
   cold (the file read, hashed and moved to the device, then copied into a slot) and
   warm (the state dict already in device memory: the copy only), and the same after an
   LRU eviction;
3. recompiles: images made through a round of switches (none, a, b, a+b, b+a at other
   weights, none), counting dynamo's recompile records and compiled frames;
4. steady img/s: --images images one call each, with no adapter, then alternating a and
   b, and with a+b together;
5. the engine's warm image time without a catalogue at all (slots cost: the LoRA layers
   and the unfused projections), when --baseline is given.

Writes results.json and summary.md to --out.

    python bench/adapters_bench.py --out "$OUT"              # GPU, full size, 1024x1024
    python bench/adapters_bench.py --tiny --out /tmp/ab      # CPU, tiny model, end to end
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks_bench  # noqa: E402
import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402

from zimage_pipeline.adapters import AdapterEntry  # noqa: E402
from zimage_pipeline.engine.architecture import FULL, TINY, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity  # noqa: E402
from zimage_pipeline.engine.optimize import optimize_pipeline  # noqa: E402
from zimage_pipeline.engine.types import GenerationSpec  # noqa: E402

PROMPT = tasks_bench.PROMPT
# Issue 17's target: an adapter switch under 1 s, without recompilation.
TARGET_SWITCH_S = 1.0
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    p.add_argument("--variant", default=next(iter(lib.VARIANTS)), choices=list(lib.VARIANTS))
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="the LoRA files' rank")
    p.add_argument("--slot-rank", type=int, default=64, help="engine.adapter_rank")
    p.add_argument("--slots", type=int, default=2, help="engine.adapter_slots")
    p.add_argument("--images", type=int, default=8, help="images per steady-state run")
    p.add_argument("--repeats", type=int, default=3, help="timed switches per kind")
    p.add_argument("--baseline", action="store_true", help="also time an engine without slots")
    return p.parse_args()


# -- LoRA files -------------------------------------------------------------------------


def lora_file(pipe: Any, directory: Path, name: str, *, rank: int, seed: int) -> AdapterEntry:
    """A random LoRA of `rank` on every targeted projection of the blocks, saved as
    diffusers saves one (``transformer.<module>.lora_A/B.weight``, bf16 on the GPU)."""
    from safetensors.torch import save_file

    from zimage_pipeline.engine.adapters import slot_targets

    generator = torch.Generator("cpu").manual_seed(seed)
    dtype = next(pipe.transformer.parameters()).dtype
    state: dict[str, torch.Tensor] = {}
    for module, (fan_in, fan_out) in slot_targets(pipe.transformer).items():
        if not module.endswith(TARGET_MODULES):
            continue
        # Scaled so that the update is a few percent of a unit-variance weight's output.
        a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=generator) * 0.05 / rank**0.5
        state[f"transformer.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        state[f"transformer.{module}.lora_B.weight"] = b.to(dtype).contiguous()
    path = directory / f"{name}.safetensors"
    save_file(state, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return AdapterEntry(name=name, path=str(path), sha256=digest)


def file_mib(entry: AdapterEntry) -> float:
    return Path(entry.path).stat().st_size / 2**20


# -- the engine -----------------------------------------------------------------------


def make_engine(
    pipe: Any, a: argparse.Namespace, dev: torch.device, adapters: tuple[AdapterEntry, ...]
) -> TurboEngine:
    options = dict(lib.VARIANTS[a.variant])
    options["linear_fp8"] = False  # exclusive with adapters
    config = EngineConfig(
        model_path="(in memory)",
        device=str(dev),
        max_batch=4,
        default_steps=a.steps,
        compile=True,  # optimize_pipeline compiles on CUDA only
        adapters=adapters,
        adapter_slots=a.slots,
        max_loaded_adapters=max(a.slots, 2),
        adapter_rank=a.slot_rank,
        **options,
    )
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    compiled = optimize_pipeline(pipe, config=config, device=dev)  # installs the slots
    return TurboEngine(pipe, config=config, device=dev, identity=identity, compiled=compiled)


def image(engine: TurboEngine, a: argparse.Namespace, seed: int, *adapters: Any) -> Any:
    spec = GenerationSpec(
        PROMPT, seed=seed, width=a.size, height=a.size, steps=a.steps, adapters=tuple(adapters)
    )
    return engine.generate([spec])[0]


def switch(engine: TurboEngine, dev: torch.device, *adapters: Any) -> dict[str, float]:
    slots = engine.adapters
    assert slots is not None
    lib.sync(dev)
    start = time.perf_counter()
    slots.activate(adapters)
    lib.sync(dev)
    return {
        "total_s": time.perf_counter() - start,
        "load_s": slots.last_switch.load_s,
        "set_s": slots.last_switch.set_s,
    }


def switch_costs(engine: TurboEngine, r: dict[str, Any], a: argparse.Namespace, dev: Any) -> None:
    slots = engine.adapters
    assert slots is not None
    costs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "after_eviction": []}
    for _ in range(a.repeats):
        slots.unload_all()
        costs["cold"].append(switch(engine, dev, ("a", 1.0)))  # read + hash + copy
        switch(engine, dev, ("b", 1.0))  # cold too: now both are warm
        costs["warm"].append(switch(engine, dev, ("a", 0.8)))  # copy only
        costs["warm"].append(switch(engine, dev, ("b", 0.8)))
        switch(engine, dev, ("c", 1.0))  # evicts the least recently used (a)
        costs["after_eviction"].append(switch(engine, dev, ("a", 1.0)))
    r["switch"] = {
        kind: {
            "median_total_s": lib.median([c["total_s"] for c in runs]),
            "median_load_s": lib.median([c["load_s"] for c in runs]),
            "median_set_s": lib.median([c["set_s"] for c in runs]),
            "runs": runs,
        }
        for kind, runs in costs.items()
    }
    slots.activate(())


def recompile_round(
    engine: TurboEngine, r: dict[str, Any], a: argparse.Namespace, log: Any
) -> None:
    mark = log.snapshot()
    rounds = [(), (("a", 1.0),), (("b", 0.7),), (("a", 1.0), ("b", 0.5)), (("b", 0.3), ("a", 0.9))]
    for index, adapters in enumerate([*rounds, ()]):
        image(engine, a, 100 + index, *adapters)
    r["recompiles_on_switches"] = log.since(mark)


def steady(engine: TurboEngine, r: dict[str, Any], a: argparse.Namespace, dev: Any) -> None:
    runs = {
        "none": [()] * a.images,
        "alternating_a_b": [
            (("a", 1.0),) if i % 2 == 0 else (("b", 1.0),) for i in range(a.images)
        ],
        "a_and_b": [(("a", 0.6), ("b", 0.6))] * a.images,
    }
    r["steady"] = {}
    for name, plan in runs.items():
        image(engine, a, 1, *plan[0])  # the first switch of the run is not its cost
        lib.sync(dev)
        start = time.perf_counter()
        for index, adapters in enumerate(plan):
            image(engine, a, 10 + index, *adapters)
        lib.sync(dev)
        seconds = time.perf_counter() - start
        r["steady"][name] = {
            "images": len(plan),
            "seconds": seconds,
            "img_per_s": len(plan) / seconds,
            "s_per_image": seconds / len(plan),
        }
    none = r["steady"]["none"]["s_per_image"]
    for name in ("alternating_a_b", "a_and_b"):
        r["steady"][name]["vs_none"] = r["steady"][name]["s_per_image"] / none


def baseline(r: dict[str, Any], a: argparse.Namespace, dev: Any, dtype: Any) -> None:
    """The engine without a catalogue (fused projections, no LoRA layers) on fresh weights."""
    pipe = build_random_pipeline(TINY if a.tiny else FULL, seed=0, dtype=dtype, device=dev)
    pipe.set_progress_bar_config(disable=True)
    engine = make_engine(pipe, a, dev, ())
    engine.warmup(width=a.size, height=a.size)
    lib.sync(dev)
    start = time.perf_counter()
    for index in range(a.images):
        image(engine, a, 10 + index)
    lib.sync(dev)
    r["baseline_no_catalogue"] = {"s_per_image": (time.perf_counter() - start) / a.images}


# -- report ---------------------------------------------------------------------------


def verdicts(r: dict[str, Any]) -> None:
    switch_s = r.get("switch", {})
    worst = max((v["median_total_s"] for v in switch_s.values()), default=None)
    recompiled = r.get("recompiles_on_switches", {})
    r["targets"] = {
        "switch_under_1s": worst is not None and worst < TARGET_SWITCH_S,
        "worst_median_switch_s": worst,
        "no_recompile_on_switch": recompiled.get("recompiles_logged") == 0
        and recompiled.get("frames_compiled") == 0,
    }


def markdown(r: dict[str, Any]) -> str:
    env, cfg = r.get("env", {}), r.get("config", {})
    lines = [
        f"# LoRA adapters: switch cost and throughput ({env.get('gpu', env.get('device'))})",
        "",
        f"{cfg.get('architecture')}, random weights, {cfg.get('size')}x{cfg.get('size')}, "
        f"{cfg.get('steps')} steps, batch 1, {cfg.get('dtype')}; LoRA files of rank "
        f"{cfg.get('rank')} ({cfg.get('file_mib', 0):.0f} MiB each), {cfg.get('slots')} slots "
        f"of rank {cfg.get('slot_rank')}; torch {env.get('torch')}, diffusers "
        f"{env.get('diffusers')}.",
        "",
        "| switch | median total s | load s | set s |",
        "|---|---|---|---|",
    ]
    for kind, v in r.get("switch", {}).items():
        lines.append(
            f"| {kind} | {v['median_total_s']:.4f} | {v['median_load_s']:.4f} | "
            f"{v['median_set_s']:.4f} |"
        )
    lines += ["", "| steady run | s/image | img/s | vs none |", "|---|---|---|---|"]
    for name, v in r.get("steady", {}).items():
        lines.append(
            f"| {name} | {v['s_per_image']:.4f} | {v['img_per_s']:.3f} | "
            f"{v.get('vs_none', 1.0):.3f} |"
        )
    if "baseline_no_catalogue" in r:
        lines.append(
            f"\nEngine without a catalogue: {r['baseline_no_catalogue']['s_per_image']:.4f} "
            "s/image."
        )
    lines += [
        "",
        f"Recompiles through a round of switches: {r.get('recompiles_on_switches')}",
        f"Warmup {r.get('warmup_s', 0):.1f} s. Targets: {r.get('targets')}",
    ]
    if r.get("notes"):
        lines += ["", "Notes:", *[f"- {note}" for note in r["notes"]]]
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    (out / "summary.md").write_text(markdown(r))


def main() -> None:
    a = parse()
    log = tasks_bench.RecompileLog().install()
    dev = torch.device("cpu" if a.tiny else "cuda")
    a.size = a.size or (128 if a.tiny else 1024)
    if a.tiny:
        a.rank, a.slot_rank, a.steps = min(a.rank, 4), min(a.slot_rank, 8), min(a.steps, 2)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    r: dict[str, Any] = {
        "env": lib.device_info(dev),
        "config": {
            "architecture": "tiny" if a.tiny else "full-size (6.15B DiT, Qwen3-4B, Flux VAE)",
            "size": a.size,
            "steps": a.steps,
            "rank": a.rank,
            "slot_rank": a.slot_rank,
            "slots": a.slots,
            "images": a.images,
            "dtype": str(dtype),
            "variant": a.variant,
            "torch_logs": os.environ.get("TORCH_LOGS"),
        },
        "notes": [],
    }
    r["build_s"], pipe = lib.timed(
        lambda: build_random_pipeline(TINY if a.tiny else FULL, seed=0, dtype=dtype, device=dev),
        dev,
    )
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as scratch:
        entries = tuple(
            lora_file(pipe, Path(scratch), name, rank=a.rank, seed=i)
            for i, name in enumerate("abc")
        )
        r["config"]["file_mib"] = file_mib(entries[0])
        engine = make_engine(pipe, a, dev, entries)
        r["compiled"] = engine.compiled
        r["warmup_s"] = engine.warmup(width=a.size, height=a.size)
        r["allocated_gib_after_warmup"] = tasks_bench.allocated_gib(dev)
        for phase in (switch_costs, steady):
            try:
                phase(engine, r, a, dev)
            except Exception as exc:  # keep what was measured
                r["notes"].append(f"{phase.__name__} failed: {type(exc).__name__}: {exc}"[:600])
            write(r, a.out)
        try:
            recompile_round(engine, r, a, log)
        except Exception as exc:
            r["notes"].append(f"recompile round failed: {type(exc).__name__}: {exc}"[:600])
        r["peak_gib"] = lib.peak_gib(dev)
    del engine, pipe
    if a.baseline:
        try:
            baseline(r, a, dev, dtype)
        except Exception as exc:
            r["notes"].append(f"baseline failed: {type(exc).__name__}: {exc}"[:600])
    if not engine_compiled_on(dev):
        r["notes"].append("not compiled (CPU): recompile counts say nothing about the GPU")
    verdicts(r)
    r["total_s"] = time.perf_counter() - PROCESS_START
    write(r, a.out)
    print(markdown(r))


def engine_compiled_on(dev: torch.device) -> bool:
    return dev.type == "cuda"


if __name__ == "__main__":
    main()
