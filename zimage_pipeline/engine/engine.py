"""TurboEngine: Z-Image-Turbo generation on one device, called from one GPU thread.

Each image gets its own ``torch.Generator`` (on the CPU, so the starting noise is the
same on every machine), so an image depends on its seed and parameters only, not on the
batch it shares: batching changes kernels' rounding, never the inputs.

Prompts are encoded padded to the longest prompt of the batch instead of diffusers'
fixed 512 tokens. The text encoder is causal and the pipeline keeps only the
attention-masked tokens, so the embeddings are the same, for far less work. With
``engine.text_encoder_graphs`` the engine encodes them itself (prompts.py): bucketed
lengths, each distinct prompt once, CUDA graphs on the GPU.

Stage timings are marked with CUDA events on the GPU's stream rather than by waiting for
the GPU between stages, so measuring them never leaves the GPU idle.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from zimage_pipeline.engine.adapters import AdapterSlots
from zimage_pipeline.engine.batching import plan_batches
from zimage_pipeline.engine.config import EngineConfig, Placement
from zimage_pipeline.engine.errors import (
    DeviceFailure,
    GenerationFailed,
    GpuOutOfMemory,
    InvalidGenerationSpec,
)
from zimage_pipeline.engine.failures import FailureKind, classify, first_line, free_device_memory
from zimage_pipeline.engine.identity import ModelIdentity
from zimage_pipeline.engine.optimize import attention_priority
from zimage_pipeline.engine.prompts import PromptEncoder, token_ids
from zimage_pipeline.engine.types import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    IMAGE_TO_IMAGE,
    INPAINT,
    TEXT_TO_IMAGE,
    GeneratedImage,
    GenerationSpec,
    SpecLike,
    StageTimings,
)
from zimage_pipeline.errors import ZImageError

log = logging.getLogger(__name__)

_WARMUP_PROMPT = "a lighthouse at dusk, long shadows, gulls over a calm sea"


class TurboEngine:
    """Not thread-safe: the worker calls it from its one GPU thread."""

    def __init__(
        self,
        pipeline: Any,
        *,
        config: EngineConfig,
        device: Any,
        identity: ModelIdentity,
        compiled: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.compiled = compiled  # torch.compile applied (load_engine: CUDA and compile on)
        self.config = config
        self.device = device
        self.identity = identity
        self._batch_limits: dict[tuple[int, int], int] = {}
        self._broken: str | None = None
        # The image-to-image and inpainting pipelines, built on first use from the loaded
        # components (task_pipeline): one set of weights in memory for every task.
        self._task_pipelines: dict[str, Any] = {TEXT_TO_IMAGE: pipeline}
        # LoRA adapters in fixed slots (installed by optimize_pipeline when configured).
        self.adapters: AdapterSlots | None = None
        if config.adapters:
            self.adapters = AdapterSlots(
                pipeline,
                config.adapters,
                slots=config.adapter_slots,
                rank=config.adapter_rank,
                max_loaded=config.max_loaded_adapters,
            )
        self.prompt_encoder: PromptEncoder | None = None
        if config.text_encoder_graphs:
            self.prompt_encoder = PromptEncoder(
                pipeline,
                device,
                bucket=config.prompt_bucket,
                # A captured graph holds the encoder's weights' addresses: only when they
                # stay on the GPU (no offload hooks moving them per call).
                graphs=config.memory_mode is Placement.GPU,
            )

    @property
    def default_steps(self) -> int:
        return self.config.default_steps

    # -- public -------------------------------------------------------------------

    def generate(self, specs: Sequence[SpecLike]) -> list[GeneratedImage]:
        """Generate one image per spec, in order; compatible specs share batches.

        Raises InvalidGenerationSpec (REJECT) for parameters the model cannot take,
        GpuOutOfMemory (FAIL) when an image does not fit even alone, GenerationFailed
        (FAIL) for other errors and DeviceFailure (FATAL) after a sticky CUDA error.
        """
        if self._broken is not None:
            raise DeviceFailure(f"the GPU failed earlier and is unusable: {self._broken}")
        normalized = [GenerationSpec.of(spec) for spec in specs]
        results: list[GeneratedImage | None] = [None] * len(normalized)
        for indices in plan_batches(normalized, self._limit_for):
            images = self._generate_splitting([normalized[i] for i in indices], splits=0)
            for index, image in zip(indices, images, strict=True):
                results[index] = image
        return [image for image in results if image is not None]

    def warmup(self, *, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> float:
        """Generate throwaway images so that compilation happens before the first request.

        One image, then (with compile on) a batch of two: the second shape makes
        torch.compile mark the batch dimension dynamic now rather than on a customer's
        request. A batch mixing prompts of different lengths (an attention mask) compiles
        its variant on first use; the worker batches one request's images, which share
        their prompt. Returns the seconds it took.
        """
        start = time.perf_counter()
        steps = self.config.default_steps
        self.generate(
            [GenerationSpec(_WARMUP_PROMPT, seed=0, width=width, height=height, steps=steps)]
        )
        if self.compiled and self.config.max_batch > 1:
            self.generate(
                [
                    GenerationSpec(
                        _WARMUP_PROMPT, seed=seed, width=width, height=height, steps=steps
                    )
                    for seed in (1, 2)
                ]
            )
        if self.compiled and self.adapters is not None:
            # The blocks' variant with LoRA layers enabled (the slots are empty: zeros).
            self.pipeline.enable_lora()
            try:
                self.generate(
                    [
                        GenerationSpec(
                            _WARMUP_PROMPT, seed=4, width=width, height=height, steps=steps
                        )
                    ]
                )
            finally:
                self.pipeline.disable_lora()
        if self.compiled:
            # The VAE encoder compiles on its first init image: here, not on a request.
            from PIL import Image

            grey = Image.new("RGB", (width, height), (128, 128, 128))
            self.generate(
                [
                    GenerationSpec(
                        _WARMUP_PROMPT,
                        seed=3,
                        width=width,
                        height=height,
                        steps=steps,
                        task=IMAGE_TO_IMAGE,
                        init_image=grey,
                    )
                ]
            )
        return time.perf_counter() - start

    # -- batching and failures ----------------------------------------------------

    def _limit_for(self, spec: GenerationSpec) -> int:
        return self._batch_limits.get((spec.width, spec.height), self.config.max_batch)

    def _generate_splitting(
        self, batch: list[GenerationSpec], *, splits: int
    ) -> list[GeneratedImage]:
        try:
            return self._run_batch(batch, splits=splits)
        except ZImageError:
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind is FailureKind.STICKY_DEVICE:
                self._broken = first_line(exc)
                raise DeviceFailure(f"sticky CUDA error: {self._broken}") from exc
            if kind is FailureKind.OTHER:
                raise GenerationFailed(f"generation failed: {first_line(exc)}") from exc
            oom = first_line(exc)
        # Out of memory. Outside the except block the traceback, and with it the failed
        # batch's activations, is released, so the memory can really be given back.
        free_device_memory()
        first = batch[0]
        if len(batch) == 1:
            raise GpuOutOfMemory(
                f"{first.width}x{first.height} does not fit in GPU memory even alone: {oom}"
            )
        half = (len(batch) + 1) // 2
        self._batch_limits[(first.width, first.height)] = half
        log.warning(
            "out of memory at batch %d (%dx%d); retrying as %d + %d",
            len(batch),
            first.width,
            first.height,
            half,
            len(batch) - half,
        )
        return self._generate_splitting(batch[:half], splits=splits + 1) + self._generate_splitting(
            batch[half:], splits=splits + 1
        )

    # -- one batch ----------------------------------------------------------------

    def _run_batch(self, batch: list[GenerationSpec], *, splits: int) -> list[GeneratedImage]:
        import torch

        start = time.perf_counter()
        self._use_adapters(batch[0].adapters)
        clock = _StageClock(self.device)
        with torch.inference_mode(), attention_priority(self.config.attention_backend, self.device):
            prompt_embeds, negative_embeds = self._encode_prompts(batch)
            clock.mark()
            latents = self._denoise(batch, prompt_embeds, negative_embeds)
            clock.mark()
            pil_images = self._decode(latents)  # ends on the host: the GPU is done
            self.pipeline.maybe_free_model_hooks()  # model offload: the VAE leaves the GPU too
        total = time.perf_counter() - start
        encode_s, denoise_s = clock.intervals()
        timings = StageTimings(
            batch_size=len(batch),
            encode_prompt_s=encode_s,
            denoise_s=denoise_s,
            decode_s=max(0.0, total - encode_s - denoise_s),
            total_s=total,
        )
        return [
            GeneratedImage(
                image=image,
                seed=spec.seed,
                width=spec.width,
                height=spec.height,
                steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                timings=timings,
                oom_splits=splits,
            )
            for spec, image in zip(batch, pil_images, strict=True)
        ]

    def _use_adapters(self, adapters: tuple[tuple[str, float], ...]) -> None:
        if self.adapters is not None:
            self.adapters.activate(adapters)
        elif adapters:
            raise InvalidGenerationSpec("this engine has no LoRA adapters configured")

    def _encode_prompts(self, batch: list[GenerationSpec]) -> tuple[list[Any], list[Any]]:
        cfg = batch[0].guidance_scale > 0
        prompts = [spec.prompt for spec in batch]
        negatives = [spec.negative_prompt or "" for spec in batch] if cfg else None
        if self.prompt_encoder is not None:  # one encoder call for both lists
            embeds = self.prompt_encoder.encode(prompts + (negatives or []))
            return embeds[: len(prompts)], embeds[len(prompts) :]
        tokenizer = self.pipeline.tokenizer
        longest = max(len(token_ids(tokenizer, text)) for text in prompts + (negatives or []))
        positive, negative = self.pipeline.encode_prompt(
            prompt=prompts,
            # Not pipeline._execution_device: that walks every module (~8 ms per call).
            device=self.device,
            do_classifier_free_guidance=cfg,
            negative_prompt=negatives,
            max_sequence_length=longest,  # <= 512: token_ids truncates as diffusers does
        )
        return list(positive), list(negative)

    def task_pipeline(self, task: str) -> Any:
        """The pipeline of `task`, built on first use around the loaded pipeline's own
        modules: one set of weights for every task. Not diffusers' `from_pipe`, which
        ends with `.to(dtype)` (float32 unless told otherwise, and one dtype for all):
        measured on an H200 that cast made an image 9.6 s instead of 1.36 s and 43 GiB
        instead of 21.7; built directly, no module is cast or copied (a test checks)."""
        built = self._task_pipelines.get(task)
        if built is None:
            from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

            cls: Any = {IMAGE_TO_IMAGE: ZImageImg2ImgPipeline, INPAINT: ZImageInpaintPipeline}[task]
            base = self.pipeline
            built = cls(
                # Its own scheduler: set_timesteps keeps per-call state on it.
                scheduler=type(base.scheduler).from_config(base.scheduler.config),
                vae=base.vae,
                text_encoder=base.text_encoder,
                tokenizer=base.tokenizer,
                transformer=base.transformer,
            )
            built.set_progress_bar_config(disable=True)
            self._task_pipelines[task] = built
        return built

    def _denoise(
        self, batch: list[GenerationSpec], prompt_embeds: list[Any], negative_embeds: list[Any]
    ) -> Any:
        import torch

        first = batch[0]
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in batch]
        inputs: dict[str, Any] = {}
        if first.task != TEXT_TO_IMAGE:
            inputs = {"image": [spec.init_image for spec in batch], "strength": first.strength}
        if first.task == INPAINT:
            inputs["mask_image"] = [spec.mask_image for spec in batch]
        output = self.task_pipeline(first.task)(
            **inputs,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds if first.guidance_scale > 0 else None,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )
        return output[0]

    def _decode(self, latents: Any) -> list[Any]:
        """VAE decode as diffusers' pipeline does it, ``vae_decode_batch`` images per decoder
        call (all calls queued before the one copy to the host); halves the batch on
        out-of-memory."""
        import torch

        vae = self.pipeline.vae
        size = self.config.vae_decode_batch
        try:
            scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            chunks = [
                vae.decode(scaled[start : start + size], return_dict=False)[0]
                for start in range(0, scaled.shape[0], size)
            ]
            pixels = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            return to_pil(self.pipeline.image_processor, pixels)
        except Exception as exc:
            if classify(exc) is not FailureKind.OUT_OF_MEMORY or latents.shape[0] == 1:
                raise
        free_device_memory()
        half = (latents.shape[0] + 1) // 2
        return self._decode(latents[:half]) + self._decode(latents[half:])


def _cuda_event() -> Any:
    import torch

    cuda: Any = torch.cuda  # Event is unannotated
    event = cuda.Event(enable_timing=True)
    event.record()
    return event


class _StageClock:
    """Stage boundaries: CUDA events on the current stream (read once the batch is done,
    so no synchronisation between stages), or the host clock on the CPU."""

    def __init__(self, device: Any) -> None:
        self._cuda = device.type == "cuda"
        self._events: list[Any] = []
        self._times = [time.perf_counter()]
        if self._cuda:
            self._events.append(_cuda_event())

    def mark(self) -> None:
        if self._cuda:
            self._events.append(_cuda_event())
        else:
            self._times.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks; call after the GPU finished the marks."""
        if self._cuda:
            self._events[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(self._events)]
        return [b - a for a, b in itertools.pairwise(self._times)]


def to_pil(processor: Any, pixels: Any) -> list[Any]:
    """``processor.postprocess(pixels, output_type="pil")`` with the float-to-uint8 step on
    the device: the same operations in the same precision (denormalize in the decoder's
    dtype, then float32 * 255, round half to even, cast), so the same bytes, but 3 MB
    instead of 12 MB cross to the host and the CPU no longer spends ~10 ms per 1024x1024
    image on it while the GPU waits for the next batch. The NCHW -> NHWC transpose is made
    contiguous on the device too: ``.cpu()`` keeps a permuted tensor's strides, and PIL
    then transposed the strided array on the CPU (~10 ms per 1024x1024 image, measured)."""
    import torch
    from PIL import Image

    images = processor._denormalize_conditionally(pixels, None)
    u8 = (images.float() * 255).round().to(torch.uint8)
    array = u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if array.shape[-1] == 1:  # diffusers' numpy_to_pil: grayscale as mode L
        return [Image.fromarray(a[..., 0], mode="L") for a in array]
    return [Image.fromarray(a) for a in array]
