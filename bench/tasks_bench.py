"""Z-Image-Turbo tasks (issue 17): text-to-image, image-to-image and inpainting, plain
diffusers (eager) against the project's TurboEngine, in one process and one run.

Builds the full-size architecture with random weights on the GPU (or the tiny one on the
CPU with --tiny), then:

1. eager diffusers as documented: ``ZImagePipeline`` for text-to-image, and
   ``ZImageImg2ImgPipeline`` / ``ZImageInpaintPipeline`` made with
   ``from_pipe(pipe, torch_dtype=...)``, called with a prompt string, a PIL image, a mask,
   ``strength``, guidance 0 and ``output_type="pil"``; one untimed call per task, then the
   median of the timed ones and the peak allocated memory of each task;
2. the ``from_pipe`` trap: the same img2img call once through ``from_pipe`` WITHOUT
   ``torch_dtype`` (diffusers then casts the shared modules to float32), its time, peak
   and dtypes; then every module is cast back (bf16 -> fp32 -> bf16 is exact) and checked;
3. the engine (``TurboEngine`` + ``optimize_pipeline``, turbo_bench's first variant):
   warmup (text-to-image), then each task's first call (its compile cost, and the
   dynamo frames compiled / recompiles logged during it), the timed calls (median, peak,
   stage timings), the image against eager's for the same seed, and a round of task
   switches counting recompiles; the modules are checked to be the same objects in the
   three pipelines and still bf16, and GPU memory not to grow when the task pipelines are
   built;
4. a probe (bench only, not the engine's code): the VAE encoder's share, eager and
   compiled, and the engine's img2img / inpaint with a compiled encoder.

Writes results.json and summary.md to --out: speed-ups against eager and the issue's
targets (engine >= 1.6x eager; img2img <= 0.64 s and inpaint <= 0.98 s at 1024x1024).

    python bench/tasks_bench.py --out "$OUT"            # GPU, full size, 1024x1024
    python bench/tasks_bench.py --tiny --out /tmp/tb    # CPU, tiny model, end to end
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import turbo_lib as lib  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from zimage_pipeline.engine.architecture import FULL, TINY, build_random_pipeline  # noqa: E402
from zimage_pipeline.engine.config import EngineConfig  # noqa: E402
from zimage_pipeline.engine.engine import TurboEngine  # noqa: E402
from zimage_pipeline.engine.identity import ModelIdentity  # noqa: E402
from zimage_pipeline.engine.optimize import optimize_pipeline  # noqa: E402
from zimage_pipeline.engine.types import (  # noqa: E402
    IMAGE_TO_IMAGE,
    INPAINT,
    TASKS,
    TEXT_TO_IMAGE,
    GenerationSpec,
)

PROMPT = (
    "A product photo of a blue ceramic teapot on an oak table, soft window light, "
    "shallow depth of field."
)
# Issue 17's targets at 1024x1024, 8 steps, strength 0.6, batch 1, bf16.
TARGET_SPEEDUP = 1.6
TARGET_S = {IMAGE_TO_IMAGE: 0.64, INPAINT: 0.98}
# The eager numbers the issue measured earlier on an H200 (for the report only).
ISSUE_EAGER_S = {TEXT_TO_IMAGE: 1.355, IMAGE_TO_IMAGE: 1.021, INPAINT: 1.569}
MODULES = ("transformer", "text_encoder", "vae")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    p.add_argument("--variant", default=next(iter(lib.VARIANTS)), choices=list(lib.VARIANTS))
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per task and path")
    p.add_argument("--no-trap", action="store_true", help="skip from_pipe without torch_dtype")
    p.add_argument("--no-probe", action="store_true", help="skip the VAE encoder probe")
    p.add_argument("--budget-s", type=float, default=420.0, help="no probe after this")
    return p.parse_args()


# -- inputs ---------------------------------------------------------------------------


def product_image(size: int) -> Image.Image:
    """A packshot-like RGB image: a lit gradient backdrop, a product shape, sensor noise
    (never flat or zero)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(17)
    base = np.stack([200 - 60 * y, 190 - 40 * x, 170 + 50 * y * x], axis=-1)
    pixels = np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    s = size
    draw.ellipse((s * 0.3, s * 0.35, s * 0.7, s * 0.8), fill=(30, 60, 170))
    draw.rectangle((s * 0.45, s * 0.25, s * 0.55, s * 0.38), fill=(40, 70, 180))
    return image


def background_mask(size: int) -> Image.Image:
    """White = repaint: everything but a box around the product (background replacement)."""
    mask = Image.new("L", (size, size), 255)
    ImageDraw.Draw(mask).rectangle((size * 0.25, size * 0.2, size * 0.75, size * 0.85), fill=0)
    return mask


# -- recompiles -----------------------------------------------------------------------


class RecompileLog(logging.Handler):
    """Counts dynamo's recompile records (emitted when TORCH_LOGS=recompiles is set, as
    bench/run_device.sh does); the dynamo frame counter is read beside it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage()[:400])

    def install(self) -> RecompileLog:
        logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(self)
        return self

    def snapshot(self) -> tuple[int, int]:
        from torch._dynamo.utils import counters

        return len(self.records), int(counters["frames"]["ok"])

    def since(self, before: tuple[int, int]) -> dict[str, Any]:
        logged, frames = self.snapshot()
        return {
            "recompiles_logged": logged - before[0],
            "frames_compiled": frames - before[1],
            "reasons": self.records[before[0] : logged][:5],
        }


# -- checks ---------------------------------------------------------------------------


def module_dtypes(pipe: Any) -> dict[str, list[str]]:
    """Every parameter dtype of each shared module (not just the first parameter's)."""
    return {
        name: sorted({str(p.dtype) for p in getattr(pipe, name).parameters()}) for name in MODULES
    }


def allocated_gib(dev: torch.device) -> float | None:
    return torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def weights_gib(pipe: Any) -> float:
    return (
        sum(
            p.numel() * p.element_size()
            for name in MODULES
            for p in getattr(pipe, name).parameters()
        )
        / 2**30
    )


def shared(pipes: dict[str, Any], base: Any) -> dict[str, bool]:
    return {
        name: all(getattr(p, name) is getattr(base, name) for p in pipes.values())
        for name in MODULES
    }


# -- eager ----------------------------------------------------------------------------


def eager_call(
    pipe: Any, task: str, seed: int, a: argparse.Namespace, inputs: dict[str, Any]
) -> Any:
    """As diffusers documents it: a prompt string, PIL inputs, output_type="pil"."""
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "height": a.size,
        "width": a.size,
        "num_inference_steps": a.steps,
        "guidance_scale": 0.0,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "pil",
    }
    if task != TEXT_TO_IMAGE:
        kwargs |= {"image": inputs["image"], "strength": a.strength}
    if task == INPAINT:
        kwargs["mask_image"] = inputs["mask"]
    return pipe(**kwargs).images[0]


def eager_phase(
    pipe: Any, r: dict[str, Any], a: argparse.Namespace, dev: torch.device, inputs: dict[str, Any]
) -> dict[str, Any]:
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    dtype = pipe.transformer.dtype
    before = allocated_gib(dev)
    pipes = {
        TEXT_TO_IMAGE: pipe,
        IMAGE_TO_IMAGE: ZImageImg2ImgPipeline.from_pipe(pipe, torch_dtype=dtype),
        INPAINT: ZImageInpaintPipeline.from_pipe(pipe, torch_dtype=dtype),
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    r["eager_from_pipe"] = {
        "allocated_gib_before": before,
        "allocated_gib_after": allocated_gib(dev),
        "shared_modules": shared(pipes, pipe),
        "dtypes_after": module_dtypes(pipe),
    }
    references: dict[str, Any] = {}
    for task, tp in pipes.items():
        forwards: list[int] = []
        hook = pipe.transformer.register_forward_hook(lambda *_: forwards.append(1))  # noqa: B023
        try:
            first_s, _ = lib.timed(lambda: eager_call(tp, task, 900, a, inputs), dev)  # noqa: B023
        finally:
            hook.remove()
        lib.reset_peak(dev)
        times = []
        for rep in range(a.repeats):
            seconds, image = lib.timed(lambda: eager_call(tp, task, 1 + rep, a, inputs), dev)  # noqa: B023
            times.append(seconds)
            if rep == 0:
                references[task] = image
        r["eager"][task] = {
            "transformer_forwards": len(forwards),
            "first_call_s": first_s,
            "times_s": times,
            "s_per_image": lib.median(times),
            "peak_gib": lib.peak_gib(dev),
        }
        print(f"eager {task}: {lib.median(times):.3f} s", flush=True)
        lib.write_json(r, a.out / "results.json")
    return references


def from_pipe_trap(
    pipe: Any, r: dict[str, Any], a: argparse.Namespace, dev: torch.device, inputs: dict[str, Any]
) -> None:
    """diffusers' from_pipe without torch_dtype: it ends with .to(float32) on the new
    pipeline, whose modules are the loaded ones. One call, its dtype, time and peak; then
    each module goes back to its own dtype (bf16 -> fp32 -> bf16 is exact)."""
    from diffusers import ZImageImg2ImgPipeline

    originals = {name: getattr(pipe, name).dtype for name in MODULES}
    trap: dict[str, Any] = {"dtypes_before": module_dtypes(pipe)}
    r["from_pipe_without_dtype"] = trap
    try:
        cast_s, tp = lib.timed(lambda: ZImageImg2ImgPipeline.from_pipe(pipe), dev)
        tp.set_progress_bar_config(disable=True)
        trap |= {
            "from_pipe_s": cast_s,
            "dtypes_after": module_dtypes(pipe),
            "base_pipeline_modules_cast": any(
                getattr(pipe, n).dtype != originals[n] for n in MODULES
            ),
            "allocated_gib_after": allocated_gib(dev),
        }
        lib.reset_peak(dev)
        seconds, _ = lib.timed(lambda: eager_call(tp, IMAGE_TO_IMAGE, 1, a, inputs), dev)
        trap |= {"img2img_one_call_s": seconds, "peak_gib": lib.peak_gib(dev)}
    except Exception as exc:  # keep the rest of the run
        trap["error"] = f"{type(exc).__name__}: {exc}"[:400]
    finally:
        for name, dtype in originals.items():
            getattr(pipe, name).to(dtype)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    trap["dtypes_restored"] = module_dtypes(pipe)
    trap["restored"] = all(getattr(pipe, n).dtype == originals[n] for n in MODULES) and all(
        len(v) == 1 for v in trap["dtypes_restored"].values()
    )
    trap["allocated_gib_restored"] = allocated_gib(dev)
    print(f"from_pipe trap: {trap.get('img2img_one_call_s')} s, {trap.get('peak_gib')}", flush=True)


# -- engine ---------------------------------------------------------------------------


def spec(task: str, seed: int, a: argparse.Namespace, inputs: dict[str, Any]) -> GenerationSpec:
    fields: dict[str, Any] = {"width": a.size, "height": a.size, "steps": a.steps, "task": task}
    if task != TEXT_TO_IMAGE:
        fields |= {"init_image": inputs["image"], "strength": a.strength}
    if task == INPAINT:
        fields["mask_image"] = inputs["mask"]
    return GenerationSpec(PROMPT, seed=seed, **fields)


def make_engine(pipe: Any, a: argparse.Namespace, dev: torch.device) -> TurboEngine:
    config = EngineConfig(
        model_path="(in memory)",
        device=str(dev),
        max_batch=4,
        default_steps=a.steps,
        compile=True,
        **lib.VARIANTS[a.variant],
    )
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    engine = TurboEngine(pipe, config=config, device=dev, identity=identity)
    engine.compiled = optimize_pipeline(pipe, config=config, device=dev)
    return engine


def engine_phase(
    engine: TurboEngine,
    r: dict[str, Any],
    a: argparse.Namespace,
    dev: torch.device,
    inputs: dict[str, Any],
    references: dict[str, Any],
    recompiles: RecompileLog,
) -> None:
    pipe = engine.pipeline
    mark = recompiles.snapshot()
    r["engine_warmup_s"] = engine.warmup(width=a.size, height=a.size)
    r["engine_warmup_compiles"] = recompiles.since(mark)
    print(f"engine warmup: {r['engine_warmup_s']:.1f} s", flush=True)
    before = allocated_gib(dev)
    pipes = {task: engine.task_pipeline(task) for task in TASKS}
    r["engine_pipelines"] = {
        "allocated_gib_before_task_pipelines": before,
        "allocated_gib_after_task_pipelines": allocated_gib(dev),
        "shared_modules": shared(pipes, pipe),
    }
    for task in TASKS:
        mark = recompiles.snapshot()
        first_s, _ = lib.timed(lambda: engine.generate([spec(task, 500, a, inputs)]), dev)  # noqa: B023
        run: dict[str, Any] = {
            "first_call_s": first_s,
            "first_call_compiles": recompiles.since(mark),
        }
        lib.reset_peak(dev)
        mark = recompiles.snapshot()
        times, stages = [], []
        for rep in range(a.repeats):
            seconds, images = lib.timed(
                lambda: engine.generate([spec(task, 1 + rep, a, inputs)]),  # noqa: B023
                dev,
            )
            times.append(seconds)
            stages.append(images[0].timings)
            if rep == 0:
                run["image_vs_eager"] = lib.image_difference(images[0].image, references[task])
        run |= {
            "times_s": times,
            "s_per_image": lib.median(times),
            "peak_gib": lib.peak_gib(dev),
            "timed_calls_compiles": recompiles.since(mark),
            "stages_s": {
                k: lib.median([getattr(s, k) for s in stages])
                for k in ("encode_prompt_s", "denoise_s", "decode_s")
            },
        }
        r["engine"][task] = run
        print(f"engine {task}: {run['s_per_image']:.3f} s (first {first_s:.1f} s)", flush=True)
        lib.write_json(r, a.out / "results.json")
    # Switching back and forth, each task already seen once: nothing should compile.
    mark = recompiles.snapshot()
    order = [TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT, IMAGE_TO_IMAGE, TEXT_TO_IMAGE, INPAINT]
    switch_times = []
    for number, task in enumerate(order):
        seconds, _ = lib.timed(lambda: engine.generate([spec(task, 40 + number, a, inputs)]), dev)  # noqa: B023
        switch_times.append({"task": task, "s": seconds})
    r["engine_switches"] = {"calls": switch_times, **recompiles.since(mark)}
    r["engine_pipelines"]["dtypes_after"] = module_dtypes(pipe)
    r["engine_pipelines"]["shared_modules_after"] = shared(pipes, pipe)


# -- probe: the VAE encoder -----------------------------------------------------------


def vae_encoder_probe(
    engine: TurboEngine,
    r: dict[str, Any],
    a: argparse.Namespace,
    dev: torch.device,
    inputs: dict[str, Any],
) -> None:
    """Bench only, not the engine's code: what the init image's VAE encode costs (the
    engine compiles the decoder, not the encoder), eager then compiled, and the engine's
    img2img / inpaint with the encoder compiled (the lead for what comes next)."""
    pipe = engine.pipeline
    probe: dict[str, Any] = {}
    r["probe_vae_encoder"] = probe
    processor = engine.task_pipeline(IMAGE_TO_IMAGE).image_processor
    pixels = processor.preprocess(inputs["image"]).to(device=dev, dtype=pipe.vae.dtype)

    def encode() -> Any:
        with torch.inference_mode():
            return pipe.vae.encode(pixels, return_dict=False)[0].mode()

    probe["preprocess_s"] = lib.median(
        [lib.timed(lambda: processor.preprocess(inputs["image"]), dev)[0] for _ in range(3)]
    )
    probe["encode_eager_s"] = lib.time_call(encode, dev, repeats=5)
    if not engine.compiled:
        probe["note"] = "no compile on this device"
        return
    pipe.vae.encoder.compile()
    probe["encode_compile_s"], _ = lib.timed(encode, dev)
    probe["encode_compiled_s"] = lib.time_call(encode, dev, repeats=5)
    for task in (IMAGE_TO_IMAGE, INPAINT):
        engine.generate([spec(task, 700, a, inputs)])
        times = [
            lib.timed(lambda: engine.generate([spec(task, 1 + rep, a, inputs)]), dev)[0]  # noqa: B023
            for rep in range(a.repeats)
        ]
        probe[f"engine_{task}_s"] = lib.median(times)
    pipe.vae.encoder._compiled_call_impl = None  # back to eager


# -- report ---------------------------------------------------------------------------


def verdicts(r: dict[str, Any], a: argparse.Namespace) -> None:
    full = not a.tiny and a.size == 1024 and a.steps == 8 and a.strength == 0.6
    for task in TASKS:
        eager = r["eager"].get(task, {}).get("s_per_image")
        engine = r["engine"].get(task, {}).get("s_per_image")
        if eager and engine:
            r["speedup"][task] = eager / engine
    for task, limit in TARGET_S.items():
        engine = r["engine"].get(task, {}).get("s_per_image")
        speedup = r["speedup"].get(task)
        r["targets"][task] = {
            f"speedup >= {TARGET_SPEEDUP}x eager (same run)": None
            if speedup is None
            else speedup >= TARGET_SPEEDUP,
            f"<= {limit} s": None if engine is None or not full else engine <= limit,
        }
    switches = r.get("engine_switches", {})
    r["targets"]["no recompile on task switch"] = (
        None
        if not switches
        else switches.get("frames_compiled", 1) == 0 and switches.get("recompiles_logged", 1) == 0
    )
    pipes = r.get("engine_pipelines", {})
    dtypes = pipes.get("dtypes_after") or {}
    r["targets"]["one set of weights, dtype kept"] = bool(
        pipes
        and all(pipes.get("shared_modules_after", {}).values())
        and all(v == [r["config"]["dtype"]] for v in dtypes.values())
    )


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    env, cfg = r.get("env", {}), r.get("config", {})
    lines = [
        f"# Z-Image-Turbo tasks: eager diffusers vs TurboEngine ({env.get('gpu', env.get('device'))})",
        "",
        f"{cfg.get('architecture')}, random weights, {cfg.get('size')}x{cfg.get('size')}, "
        f"{cfg.get('steps')} steps, strength {cfg.get('strength')}, batch 1, {cfg.get('dtype')}, "
        f"engine variant `{cfg.get('variant')}`; torch {env.get('torch')}, diffusers "
        f"{env.get('diffusers')}, transformers {env.get('transformers')}. Median of "
        f"{cfg.get('repeats')} timed calls after one untimed call per task and path.",
        "",
        "| task | eager s | engine s | speed-up | eager peak GiB | engine peak GiB | engine first call s | compiles in first call (frames / recompiles logged) | engine stages encode / denoise / decode s | image vs eager (PSNR dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        e, g = r["eager"].get(task, {}), r["engine"].get(task, {})
        first = g.get("first_call_compiles") or {}
        st = g.get("stages_s") or {}
        lines.append(
            f"| {task} | {_f(e.get('s_per_image'))} | {_f(g.get('s_per_image'))} "
            f"| {_f(r['speedup'].get(task), 2)}x | {_f(e.get('peak_gib'), 1)} | {_f(g.get('peak_gib'), 1)} "
            f"| {_f(g.get('first_call_s'), 2)} | {first.get('frames_compiled', '-')} / {first.get('recompiles_logged', '-')} "
            f"| {_f(st.get('encode_prompt_s'))} / {_f(st.get('denoise_s'))} / {_f(st.get('decode_s'))} "
            f"| {_f((g.get('image_vs_eager') or {}).get('psnr_db'), 1)} |"
        )
    warm = r.get("engine_warmup_compiles") or {}
    lines += [
        "",
        f"Engine warmup (text-to-image, compiles): {_f(r.get('engine_warmup_s'), 1)} s, "
        f"{warm.get('recompiles_logged', '-')} recompiles logged (dynamo's frame counter: "
        f"{warm.get('frames_compiled', '-')}).",
    ]
    sw = r.get("engine_switches")
    if sw:
        lines.append(
            f"Task switches ({' -> '.join(c['task'] for c in sw['calls'])}): "
            f"{sw['frames_compiled']} frames compiled, {sw['recompiles_logged']} recompiles "
            f"logged; times {[round(c['s'], 3) for c in sw['calls']]} s."
        )
    pipes = r.get("engine_pipelines", {})
    if pipes:
        lines.append(
            f"Engine task pipelines: modules shared {pipes.get('shared_modules_after')}, dtypes "
            f"after the run {pipes.get('dtypes_after')}, allocated "
            f"{_f(pipes.get('allocated_gib_before_task_pipelines'), 2)} -> "
            f"{_f(pipes.get('allocated_gib_after_task_pipelines'), 2)} GiB when they were built "
            f"(weights {_f(r.get('weights_gib'), 2)} GiB)."
        )
    ef = r.get("eager_from_pipe", {})
    if ef:
        lines.append(
            f"Eager `from_pipe(..., torch_dtype=...)`: modules shared {ef.get('shared_modules')}, "
            f"allocated {_f(ef.get('allocated_gib_before'), 2)} -> {_f(ef.get('allocated_gib_after'), 2)} GiB."
        )
    trap = r.get("from_pipe_without_dtype", {})
    if trap:
        lines.append(
            f"`from_pipe` WITHOUT torch_dtype (one img2img call): {_f(trap.get('img2img_one_call_s'), 2)} s, "
            f"peak {_f(trap.get('peak_gib'), 1)} GiB, the loaded pipeline's modules became "
            f"{trap.get('dtypes_after')} (cast: {trap.get('base_pipeline_modules_cast')}; "
            f"from_pipe itself {_f(trap.get('from_pipe_s'), 2)} s); restored to "
            f"{trap.get('dtypes_restored')}: {trap.get('restored')}"
            + (f"; error: {trap['error']}" if trap.get("error") else "")
            + "."
        )
    probe = r.get("probe_vae_encoder")
    if probe:
        lines.append(
            f"Probe (bench only): image preprocess {_f(probe.get('preprocess_s'))} s; VAE encode "
            f"eager {_f(probe.get('encode_eager_s'))} s, compiled {_f(probe.get('encode_compiled_s'))} s "
            f"(first call {_f(probe.get('encode_compile_s'), 1)} s); engine with the encoder "
            f"compiled: img2img {_f(probe.get(f'engine_{IMAGE_TO_IMAGE}_s'))} s, inpaint "
            f"{_f(probe.get(f'engine_{INPAINT}_s'))} s."
        )
    lines += ["", "Targets:", ""]
    for name, value in r.get("targets", {}).items():
        if isinstance(value, dict):
            lines += [f"- {name}: " + "; ".join(f"{k}: {_f(v)}" for k, v in value.items())]
        else:
            lines.append(f"- {name}: {_f(value)}")
    lines.append(
        f"\nIssue's earlier eager figures (H200): {ISSUE_EAGER_S}. Total {_f(r.get('total_s'), 0)} s."
    )
    if r.get("notes"):
        lines += ["", *[f"- {n}" for n in r["notes"]]]
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    (out / "summary.md").write_text(markdown(r))


def main() -> None:
    a = parse()
    recompiles = RecompileLog().install()
    dev = torch.device("cpu" if a.tiny else "cuda")
    a.size = a.size or (128 if a.tiny else 1024)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    r: dict[str, Any] = {
        "env": lib.device_info(dev),
        "config": {
            "architecture": "tiny" if a.tiny else "full-size (6.15B DiT, Qwen3-4B, Flux VAE)",
            "size": a.size,
            "steps": a.steps,
            "strength": a.strength,
            "repeats": a.repeats,
            "dtype": str(dtype),
            "variant": a.variant,
            "variant_options": lib.VARIANTS[a.variant],
            "torch_logs": os.environ.get("TORCH_LOGS"),
        },
        "eager": {},
        "engine": {},
        "speedup": {},
        "targets": {},
        "notes": [],
    }
    r["import_s"] = time.perf_counter() - PROCESS_START
    r["build_s"], pipe = lib.timed(
        lambda: build_random_pipeline(TINY if a.tiny else FULL, seed=0, dtype=dtype, device=dev),
        dev,
    )
    pipe.set_progress_bar_config(disable=True)
    r["weights_gib"] = weights_gib(pipe)
    r["allocated_gib_after_build"] = allocated_gib(dev)
    inputs = {"image": product_image(a.size), "mask": background_mask(a.size)}
    references = eager_phase(pipe, r, a, dev, inputs)
    if not a.no_trap:
        from_pipe_trap(pipe, r, a, dev, inputs)
    write(r, a.out)
    print(f"eager done at {time.perf_counter() - PROCESS_START:.0f} s", flush=True)
    engine = make_engine(pipe, a, dev)
    try:
        engine_phase(engine, r, a, dev, inputs, references, recompiles)
    except Exception as exc:  # keep what was measured
        r["notes"].append(f"engine failed: {type(exc).__name__}: {exc}"[:600])
    verdicts(r, a)
    write(r, a.out)
    print(f"engine done at {time.perf_counter() - PROCESS_START:.0f} s", flush=True)
    if not a.no_probe and time.perf_counter() - PROCESS_START < a.budget_s:
        try:
            vae_encoder_probe(engine, r, a, dev, inputs)
        except Exception as exc:
            r["notes"].append(f"probe failed: {type(exc).__name__}: {exc}"[:600])
    elif not a.no_probe:
        r["notes"].append("VAE encoder probe skipped: time budget spent")
    r["total_s"] = time.perf_counter() - PROCESS_START
    write(r, a.out)
    print(markdown(r))


if __name__ == "__main__":
    main()
