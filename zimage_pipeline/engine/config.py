"""The engine's own configuration: a plain dataclass, built from EngineSettings.

Kept free of pydantic so that the benchmark can drive the engine on a machine that has
torch and diffusers but not the rest of the project's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from zimage_pipeline.adapters import AdapterEntry
from zimage_pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from zimage_pipeline.settings import EngineSettings


class Placement(StrEnum):
    GPU = "gpu"  # every component on the GPU (about 21 GB in bf16)
    MODEL_OFFLOAD = "model_offload"  # one component on the GPU at a time
    SEQUENTIAL_OFFLOAD = "sequential_offload"  # layer by layer: 16 GB cards, slow


# "sdpa" lets PyTorch choose (flash on Hopper); "sdpa_cudnn" puts cuDNN's fused attention
# first in PyTorch's priority list and falls back to the others where it cannot run; any
# other value is a diffusers attention backend name (e.g. "flash", "_flash_3", "sage").
SDPA = "sdpa"
SDPA_CUDNN = "sdpa_cudnn"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str
    revision: str | None = None
    device: str = "auto"
    memory_mode: Placement = Placement.GPU
    attention_backend: str = SDPA
    max_batch: int = 4
    default_steps: int = 8
    compile: bool = True  # torch.compile of the repeated blocks and the VAE decoder; CUDA only
    compile_mode: str | None = None  # None = inductor's default; e.g. "max-autotune-no-cudagraphs"
    real_rope: bool = True  # real-valued RoPE (fusable by inductor); same math as diffusers'
    compile_text_encoder: bool = (
        False  # torch.compile of the Qwen3 layers: ~5-10 ms, +24 s cold compile
    )
    compile_cache_dir: str | None = None  # None = inductor's default (a per-user temp dir)
    fuse_projections: bool = True  # q/k/v and FFN w1/w3 as one GEMM each; same dot products
    text_encoder_graphs: bool = True  # own prompt encoding (prompts.py); CUDA graphs on a GPU
    prompt_bucket: int = 32  # prompts padded to a multiple of this many tokens (graph shapes)
    vae_decode_batch: int = 1  # images per VAE decoder call (1: its static batch-1 graph)
    # LOSSY, opt-in (fp8.py): the blocks' projections as FP8 GEMMs; not bf16-equal output.
    linear_fp8: bool = False
    # LoRA adapters a request may name (adapters.py, engine/adapters.py); none: no slots.
    adapters: tuple[AdapterEntry, ...] = ()
    adapter_slots: int = 2  # adapters at once: fixed LoRA slots, so no recompile on a switch
    max_loaded_adapters: int = 3  # adapters kept in device memory (LRU)
    adapter_rank: int = 64  # the largest rank an adapter may have (the slots' rank)

    def __post_init__(self) -> None:
        if self.adapters and self.linear_fp8:
            raise ConfigError(
                "[adapters] and engine.linear_fp8 are exclusive: LoRA layers wrap bf16 "
                "linear layers, not FP8 ones"
            )
        if self.max_loaded_adapters < self.adapter_slots:
            raise ConfigError("engine.max_loaded_adapters must be at least engine.adapter_slots")
        if self.max_batch < 1:
            raise ConfigError("engine.max_batch must be at least 1")
        if self.default_steps < 1:
            raise ConfigError("engine.default_steps must be at least 1")
        if self.vae_decode_batch < 1:
            raise ConfigError("engine.vae_decode_batch must be at least 1")
        if self.prompt_bucket < 1:
            raise ConfigError("engine.prompt_bucket must be at least 1")
        if self.text_encoder_graphs and self.compile_text_encoder:
            raise ConfigError(
                "engine.text_encoder_graphs and engine.compile_text_encoder are exclusive: "
                "a CUDA graph replays the eager encoder; turn one of them off"
            )

    @classmethod
    def from_settings(
        cls, settings: EngineSettings, adapters: tuple[AdapterEntry, ...] = ()
    ) -> EngineConfig:
        return cls(
            model_path=settings.model_path,
            revision=settings.revision,
            device=settings.device,
            memory_mode=Placement(settings.memory_mode.value),
            attention_backend=settings.attention_backend,
            max_batch=settings.max_batch,
            default_steps=settings.default_steps,
            compile=settings.compile,
            compile_mode=settings.compile_mode or None,
            real_rope=settings.real_rope,
            compile_text_encoder=settings.compile_text_encoder,
            compile_cache_dir=settings.compile_cache_dir or None,
            fuse_projections=settings.fuse_projections,
            text_encoder_graphs=settings.text_encoder_graphs,
            prompt_bucket=settings.prompt_bucket,
            vae_decode_batch=settings.vae_decode_batch,
            linear_fp8=settings.linear_fp8,
            adapters=adapters,
            adapter_slots=settings.adapter_slots,
            max_loaded_adapters=settings.max_loaded_adapters,
            adapter_rank=settings.adapter_rank,
        )


def resolve_device(name: str) -> torch.device:
    """ "auto" is the first CUDA device when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"engine.device: not a device: {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device is {name!r} but this torch build sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"engine.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the weights' own precision), float32 on the CPU (bf16 matmuls there
    are slow and inexact)."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32
