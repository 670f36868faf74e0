"""Scale-out on one host (issue 19): images/s with one worker process, then with one per
GPU, in the same run; GPU busy per GPU; host CPU per image.

Each worker is its own process, pinned to its GPU the way `zimage-pipeline worker
--devices` pins it (the same environment: CUDA_VISIBLE_DEVICES, a worker id, set before
torch is imported; zimage_pipeline/worker/supervisor.py's `child_specs`). All workers of
a phase take requests from one shared stream (a queue the parent fills once every worker
is warm), so a faster GPU takes more. Per request a worker does what the production
worker does on its GPU and CPU: TurboEngine.generate (full-size random weights, bf16,
compiled, 1024x1024, 8 steps), then the ProvenanceEncoder (PNG, XMP, and with --c2pa a
C2PA manifest signed with a throwaway ES256 chain) and the SHA-256 the store sends, on a
small thread pool that overlaps the next image's generation, as the worker's I/O pool does.

Not measured here: the broker, the ledger and the object store (the device machines run
no RabbitMQ or PostgreSQL); bench/control_plane.py measures those, per request, on the
CPU. What this adds is whether N GPUs on one host give N times one GPU when each worker's
host-side work (encoding, signing, hashing, the Python that drives the GPU) runs beside
the others'.

Measured per phase: images/s over the window from the first request handed out to the
last image finished; per worker its images and engine-busy share (time inside generate /
window); per GPU the mean utilisation sampled by nvidia-smi every 200 ms over the window
(absent on a host without it); host CPU seconds per image (user + system of the worker
processes over the window, from /proc, divided by images). Targets (issue 19): N workers
>= 0.95 * N x one worker's images/s (1.9x for two), each GPU >= 95 % busy.

    bench/run_device.sh with SCRIPT=bench/scaleout_bench.py -- --gpus 0,1 --c2pa
    python bench/scaleout_bench.py --tiny --gpus 0,1 --out /tmp/sc   # CPU dry run

The dry run (--tiny) uses the tiny random model on the CPU, uncompiled, at 256x256 and 2
steps, with CUDA_VISIBLE_DEVICES naming GPUs that are not there: it proves the plumbing
(processes, pinning, the shared stream, the sampling, the report), not any speed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zimage_pipeline.worker.supervisor import child_specs, parse_devices  # noqa: E402

PROMPT = "a lighthouse on a rocky coast at dusk, photographic, 35 mm"
READY_TIMEOUT_S = 1800.0  # a cold compile of the full model takes minutes


# -- the worker process (spawned: imports torch only here) ---------------------------------


def _cpu_seconds() -> float:
    """This process's user + system CPU time, all threads (what /proc counts)."""
    times = os.times()
    return times.user + times.system


def worker_main(
    index: int, options: dict[str, Any], jobs: Any, results: Any, signing: dict[str, str] | None
) -> None:
    import torch

    from zimage_pipeline.engine.architecture import FULL, TINY, build_random_pipeline
    from zimage_pipeline.engine.config import EngineConfig
    from zimage_pipeline.engine.engine import TurboEngine
    from zimage_pipeline.engine.identity import ModelIdentity
    from zimage_pipeline.engine.optimize import optimize_pipeline
    from zimage_pipeline.engine.types import GenerationSpec
    from zimage_pipeline.messages import GenerationRequest, ImageFormat
    from zimage_pipeline.ports import ModelIdentity as PortIdentity
    from zimage_pipeline.ports import RawImage
    from zimage_pipeline.provenance.c2pa_manifest import C2paSigningConfig
    from zimage_pipeline.wiring.outputs import ProvenanceEncoder

    tiny = bool(options["tiny"])
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda:0")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    pipe = build_random_pipeline(TINY if tiny else FULL, seed=0, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    config = EngineConfig(
        model_path="(in memory)",
        device=str(device),
        max_batch=1,
        default_steps=options["steps"],
        compile=not tiny,
    )
    identity = ModelIdentity(
        name="random-weights", revision=None, weights_sha256="0" * 64, source="memory"
    )
    engine = TurboEngine(pipe, config=config, device=device, identity=identity)
    if not tiny:
        engine.compiled = optimize_pipeline(pipe, config=config, device=device)
    warm_s = engine.warmup(width=options["size"], height=options["size"])
    c2pa = None
    if signing is not None:
        from pydantic import SecretStr

        c2pa = C2paSigningConfig(
            algorithm="es256",
            cert_chain_pem=signing["chain"],
            private_key_pem=SecretStr(signing["key"]),
        )
    encoder = ProvenanceEncoder(creator_tool="scaleout-bench", c2pa=c2pa)
    model = PortIdentity("random-weights", None, "0" * 64)
    results.put(
        {
            "kind": "ready",
            "worker": index,
            "device": str(device),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "worker_id": os.environ.get("ZIMAGE_WORKER__WORKER_ID"),
            "warmup_s": warm_s,
        }
    )
    cpu_at_start: float | None = None
    busy_s = 0.0

    def finish(seed: int, image: Any, started: float, generated: float) -> None:
        """The host side of one image, as the worker's I/O pool does it: encode, sign,
        hash. It overlaps the next image's generation (the worker's GPU thread does not
        wait for it either)."""
        request = GenerationRequest(
            request_id=f"scaleout-{seed}",
            on_behalf_of="bench",
            prompt=PROMPT,
            format=ImageFormat.PNG,
        )
        encoded = encoder.encode(
            RawImage(image.image, seed, options["size"], options["size"], 0),
            request=request,
            model=model,
            created_at=datetime.now(UTC),
        )
        digest = hashlib.sha256(encoded.data).hexdigest()
        results.put(
            {
                "kind": "image",
                "worker": index,
                "seed": seed,
                "started": started,
                "generated": generated,
                "finished": time.time(),
                "bytes": len(encoded.data),
                "sha256": digest[:16],
            }
        )

    host_side = ThreadPoolExecutor(max_workers=options.get("io_threads", 2))
    pending: list[Future[None]] = []
    while True:
        job = jobs.get()
        if job is None:
            break
        if cpu_at_start is None:
            cpu_at_start = _cpu_seconds()
        seed = int(job)
        started = time.time()
        spec = GenerationSpec(
            PROMPT, seed=seed, width=options["size"], height=options["size"], steps=options["steps"]
        )
        (image,) = engine.generate([spec])
        generated = time.time()
        busy_s += generated - started
        pending.append(host_side.submit(finish, seed, image, started, generated))
    for future in pending:
        future.result()  # an encoding error fails the bench, as it would the request
    host_side.shutdown()
    results.put(
        {
            "kind": "done",
            "worker": index,
            "cpu_s": _cpu_seconds() - (cpu_at_start or _cpu_seconds()),
            "busy_s": busy_s,
        }
    )


# -- GPU sampling ---------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi's utilisation per physical GPU every 200 ms, while running."""

    def __init__(self, gpus: list[int]) -> None:
        self.gpus = gpus
        self.samples: dict[int, list[tuple[float, float]]] = {g: [] for g in gpus}
        self.available = shutil.which("nvidia-smi") is not None
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.available:
            return
        self._process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", "200"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in self.samples:
                try:
                    self.samples[int(parts[0])].append((time.time(), float(parts[1])))
                except ValueError:
                    continue

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mean_busy(self, start: float, end: float) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for gpu, samples in self.samples.items():
            inside = [u for t, u in samples if start <= t <= end]
            out[str(gpu)] = round(statistics.fmean(inside), 1) if inside else None
        return out


# -- one phase ------------------------------------------------------------------------


def run_phase(
    gpus: list[int], a: argparse.Namespace, signing: dict[str, str] | None
) -> dict[str, Any]:
    context = mp.get_context("spawn")
    jobs = context.Queue()
    results = context.Queue()
    options = {"tiny": a.tiny, "size": a.size, "steps": a.steps}
    specs = child_specs(gpus, base_port=0, host="bench")
    processes = []
    saved = dict(os.environ)
    try:
        for index, spec in enumerate(specs):
            # The child's environment is taken at start: pin it before torch loads there.
            os.environ.update(spec.env)
            process = context.Process(
                target=worker_main, args=(index, options, jobs, results, signing), daemon=True
            )
            process.start()
            processes.append(process)
            os.environ.clear()
            os.environ.update(saved)
        ready = [_expect(results, ("ready",), processes) for _ in specs]
        sampler = GpuSampler(gpus)
        sampler.start()
        time.sleep(1.0 if sampler.available else 0.0)  # the sampler's first lines
        window_start = time.time()
        for seed in range(a.images):
            jobs.put(seed)
        for _ in specs:
            jobs.put(None)
        # A worker's "done" may come before another's last images: sort them as they come.
        images: list[dict[str, Any]] = []
        done: list[dict[str, Any]] = []
        while len(images) < a.images or len(done) < len(specs):
            message = _expect(results, ("image", "done"), processes)
            (images if message["kind"] == "image" else done).append(message)
        window_end = max(i["finished"] for i in images)
        sampler.stop()
        for process in processes:
            process.join(timeout=120)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        os.environ.clear()
        os.environ.update(saved)
    window = window_end - window_start
    per_worker = []
    for index, spec in enumerate(specs):
        mine = [i for i in images if i["worker"] == index]
        finished = next(d for d in done if d["worker"] == index)
        per_worker.append(
            {
                "gpu": spec.device,
                "worker_id": next(r for r in ready if r["worker"] == index)["worker_id"],
                "visible_devices": next(r for r in ready if r["worker"] == index)["visible"],
                "device": next(r for r in ready if r["worker"] == index)["device"],
                "warmup_s": round(next(r for r in ready if r["worker"] == index)["warmup_s"], 2),
                "images": len(mine),
                "engine_busy": round(finished["busy_s"] / window, 3),
                "cpu_s": round(finished["cpu_s"], 2),
                "encode_s_median": round(
                    statistics.median(i["finished"] - i["generated"] for i in mine), 4
                )
                if mine
                else None,
            }
        )
    cpu_s = sum(d["cpu_s"] for d in done)
    return {
        "gpus": gpus,
        "workers": len(specs),
        "images": a.images,
        "window_s": round(window, 2),
        "images_per_s": round(a.images / window, 3),
        "host_cpu_s_per_image": round(cpu_s / a.images, 3),
        "gpu_busy_percent": sampler.mean_busy(window_start, window_end),
        "gpu_sampling": "nvidia-smi -lms 200" if sampler.available else "none (no nvidia-smi)",
        "per_worker": per_worker,
        "distinct_images": len({i["sha256"] for i in images}),
    }


def _expect(results: Any, kinds: tuple[str, ...], processes: list[Any]) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            message: dict[str, Any] = results.get(timeout=5)
        except queue.Empty:
            dead = [p.pid for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"scaleout: worker process(es) {dead} died") from None
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"scaleout: no {kinds} message in {READY_TIMEOUT_S:.0f} s"
                ) from None
            continue
        if message["kind"] not in kinds:
            raise SystemExit(f"scaleout: expected {kinds}, got {message}")
        return message


# -- the run --------------------------------------------------------------------------


def _signing_material() -> dict[str, str]:
    """A throwaway ES256 chain (the tests' generator), so that signing costs what it
    costs in production without any real key on the device."""
    from tests.c2pa_test_certs import make_chain

    chain = make_chain("zimage-pipeline scale-out bench signer")
    return {"chain": chain.chain_pem, "key": chain.key_pem}


def markdown(r: dict[str, Any]) -> str:
    many = r["phases"][-1]
    lines = [
        f"# Scale-out on one host ({r['host']}, {r['when']})",
        "",
        f"{r['mode']}; {r['size']}x{r['size']}, {r['steps']} steps, {r['images']} images "
        f"per phase, C2PA {'on' if r['c2pa'] else 'off'}.",
        "",
        "| phase | workers | images/s | host CPU s/image | GPU busy % | engine busy |",
        "|---|---|---|---|---|---|",
    ]
    for phase in r["phases"]:
        busy = ", ".join(f"GPU {g}: {v}" for g, v in phase["gpu_busy_percent"].items())
        engine = ", ".join(f"{w['gpu']}: {w['engine_busy']}" for w in phase["per_worker"])
        lines.append(
            f"| {phase['gpus']} | {phase['workers']} | {phase['images_per_s']} | "
            f"{phase['host_cpu_s_per_image']} | {busy} | {engine} |"
        )
    if r["scale"] is None:  # a one-GPU rehearsal: no comparison to make
        lines += ["", f"One GPU only: GPU busy >= 95 %: {r['targets']['busy_met']}."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Scale: {r['scale']}x with {many['workers']} workers (target "
        f">= {r['targets']['scale']}x): {'met' if r['targets']['scale_met'] else 'NOT met'}.",
        f"GPU busy >= 95 % on every GPU: {r['targets']['busy_met']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="0,1", help="GPU indexes; phase 2 uses all of them")
    parser.add_argument("--images", type=int, default=None, help="per phase")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--c2pa", action="store_true", help="sign every image (ES256)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run, tiny model")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="scaleout-")))
    a = parser.parse_args()
    gpus = parse_devices(a.gpus)
    # One GPU: a rehearsal on a one-GPU host (issue 19 while two-GPU hosts are not lent):
    # phase 1 only, what one worker gets out of its GPU and costs the host per image.
    rehearsal = len(gpus) == 1
    a.images = a.images or (6 if a.tiny else 96)
    a.size = a.size or (256 if a.tiny else 1024)
    a.steps = a.steps or (2 if a.tiny else 8)
    signing = _signing_material() if a.c2pa else None
    a.out.mkdir(parents=True, exist_ok=True)
    phases = [run_phase(gpus[:1], a, signing)]
    if not rehearsal:
        phases.append(run_phase(gpus, a, signing))
    scale = None if rehearsal else phases[1]["images_per_s"] / phases[0]["images_per_s"]
    busy = [v for v in phases[-1]["gpu_busy_percent"].values()]
    target = round(0.95 * len(gpus), 2)
    results = {
        "host": platform.node(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "CPU dry run (tiny model, fake GPUs)" if a.tiny else "GPU, full-size weights",
        "size": a.size,
        "steps": a.steps,
        "images": a.images,
        "c2pa": a.c2pa,
        "phases": phases,
        "scale": None if scale is None else round(scale, 3),
        "targets": {
            "scale": target,
            "scale_met": None if scale is None else scale >= target,
            "busy_met": bool(busy) and all(v is not None and v >= 95 for v in busy),
        },
    }
    (a.out / "scaleout.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (a.out / "scaleout.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    print(f"results: {a.out}/scaleout.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
