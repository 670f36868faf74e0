"""Speed-ups, each selected by configuration; all lossless but ``linear_fp8``.

- ``compile``: ``torch.compile`` of the transformer's repeated blocks (regional
  compilation: one compiled graph serves all 30 main layers, so start-up compiles a block
  once instead of the whole model) and of the VAE decoder. The math is the same; only
  kernel fusion and bf16 rounding order change.
- ``sdpa_cudnn``: cuDNN's fused attention first in PyTorch's SDPA priority list, with
  flash / memory-efficient / math as fallbacks for inputs cuDNN cannot take. The choice
  is made while tracing; changing it between restarts may reuse graphs from the on-disk
  compile cache traced with the other kernel (both exact, only the speed differs).
- ``real_rope`` (rope.py): RoPE with real tensors, so inductor fuses it into the blocks.
- ``compile_text_encoder``: ``torch.compile`` of the Qwen3 decoder layers, one graph with
  a dynamic sequence length (prompts vary), so the 36-layer encoder stops being bound by
  Python and kernel launches (about 900 small kernels per prompt).
- ``fuse_projections`` (fusion.py): q/k/v and the FFN's w1/w3 as one GEMM each.
- ``text_encoder_graphs`` (prompts.py, used by the engine): prompts at bucketed lengths,
  encoded by a CUDA graph per shape.
- ``linear_fp8`` (fp8.py): the only LOSSY option, off by default: the blocks' projections
  as FP8 GEMMs (per-row weight and per-token activation scales).
- ``compile_cache_dir``: inductor's on-disk caches (FX graphs, Triton kernels) in a
  directory that outlives the process, so a restart loads compiled graphs instead of
  compiling them again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zimage_pipeline.engine.config import SDPA_CUDNN, EngineConfig, Placement

log = logging.getLogger(__name__)


def optimize_pipeline(pipe: Any, *, config: EngineConfig, device: Any) -> bool:
    """Apply the configured speed-ups to a placed pipeline, in the order they need
    (rewrites before compiling). Returns whether torch.compile was applied."""
    from zimage_pipeline.engine.fusion import fuse_projections
    from zimage_pipeline.engine.rope import use_real_rope

    # Inference only. from_pretrained leaves requires_grad on, and the compiled graphs'
    # on-disk cache keys include it: a model read from disk then missed a cache filled
    # by the same model built in memory (measured: 62 s of warmup instead of ~20).
    for name in ("transformer", "text_encoder", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    if config.real_rope:
        use_real_rope(pipe.transformer)
    if config.fuse_projections and config.adapters:
        # LoRA layers wrap diffusers' own q/k/v and w1/w3 modules, which fusion replaces.
        log.warning("engine.fuse_projections ignored: [adapters] are configured")
    elif config.fuse_projections:
        if config.memory_mode is Placement.SEQUENTIAL_OFFLOAD:
            # Offload hooks sit on each linear layer; new fused layers would have none.
            log.warning("engine.fuse_projections ignored with sequential offload")
        else:
            fuse_projections(pipe.transformer)
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()  # the unfused weights' blocks
    if config.linear_fp8:
        quantize_lossy(pipe, config=config, device=device)
    # The text encoder is only read once per prompt: its KV cache is copying for nothing
    # (the embeddings are the same), and its per-layer state makes torch.compile
    # recompile each layer (36 variants, past the recompile limit).
    if getattr(pipe.text_encoder.config, "use_cache", False):
        pipe.text_encoder.config.use_cache = False
    if config.adapters:
        from zimage_pipeline.engine.adapters import install_slots

        # Before compiling: the compiled blocks then include the slots' LoRA layers.
        install_slots(pipe, slots=config.adapter_slots, rank=config.adapter_rank)
    if not config.compile or device.type != "cuda":
        return False
    if config.memory_mode is Placement.SEQUENTIAL_OFFLOAD:
        log.warning("engine.compile ignored with sequential offload (weights move per layer)")
        return False
    if config.compile_cache_dir:
        use_compile_cache(config.compile_cache_dir)
    compile_pipeline(pipe, mode=config.compile_mode)
    if config.compile_text_encoder:
        compile_text_encoder(pipe)
    return True


def quantize_lossy(pipe: Any, *, config: EngineConfig, device: Any) -> int:
    """``linear_fp8`` (fp8.py), the one lossy option: after fusion, before compiling.
    Returns how many layers now run in FP8 (0 where the option cannot apply)."""
    from zimage_pipeline.engine.fp8 import quantize_linears, supports_fp8

    if config.memory_mode is Placement.SEQUENTIAL_OFFLOAD:
        # Offload hooks sit on each linear layer; the FP8 layers would have none.
        log.warning("engine.linear_fp8 ignored with sequential offload")
        return 0
    if not supports_fp8(device):
        log.warning("engine.linear_fp8 ignored: %s has no FP8 tensor cores", device)
        return 0
    replaced = quantize_linears(pipe.transformer)
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()  # the bf16 weights' blocks
    return replaced


def compile_pipeline(pipe: Any, *, mode: str | None) -> None:
    """Compile in place; the first call of each new shape pays the compilation."""
    import torch

    # Batch size and caption length vary between requests; after the first recompile
    # dynamo marks those dimensions dynamic instead of recompiling for every value.
    torch._dynamo.config.automatic_dynamic_shapes = True
    # One block function serves refiners and main layers, with and without modulation
    # and attention mask, at batch 1 and batch n: about 8 variants, the default limit.
    # Past the limit dynamo silently runs eager, a slowdown nobody would notice.
    dynamo_config: Any = torch._dynamo.config
    limit_name = (
        "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    )
    setattr(dynamo_config, limit_name, 64)
    options: dict[str, Any] = {"fullgraph": True}
    if mode:
        options["mode"] = mode
    pipe.transformer.compile_repeated_blocks(**options)
    # The decoder has data-dependent Python branches (upcasting), so no fullgraph here.
    pipe.vae.decoder.compile(**({"mode": mode} if mode else {}))
    # The encoder turns image_to_image and inpaint's init images into latents (twice
    # for inpaint): 58 ms eager, 20 ms compiled on an H200 (bench/NOTES.md, tasks).
    pipe.vae.encoder.compile(**({"mode": mode} if mode else {}))
    log.info("torch.compile enabled (mode=%s): transformer blocks, VAE decoder and encoder", mode)


def compile_text_encoder(pipe: Any) -> int:
    """Compile each decoder layer of the text encoder (the same code, so one graph serves
    all); ``dynamic=True`` from the start so that a new prompt length never recompiles on
    a request. Returns how many layers were compiled."""
    encoder = pipe.text_encoder  # Qwen3Model in Z-Image; a *ForCausalLM wraps it in .model
    layers = getattr(encoder, "layers", None) or getattr(
        getattr(encoder, "model", None), "layers", None
    )
    if layers is None:
        log.warning("compile_text_encoder: no decoder layers found; left eager")
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("torch.compile enabled: %d text encoder layers", len(layers))
    return len(layers)


def use_compile_cache(directory: str) -> None:
    """Point inductor's on-disk caches at ``directory`` (created if missing). Call before
    the first compilation: inductor and Triton read the location when they first need it.
    The environment is the only interface they offer for it, hence the write."""
    import torch

    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    # Triton's kernels go to <dir>/triton unless TRITON_CACHE_DIR says otherwise.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    inductor: Any = torch._inductor.config
    inductor.fx_graph_cache = True
    if hasattr(inductor, "autograd_cache"):
        inductor.autograd_cache = True
    log.info("compile cache in %s", path)


@contextlib.contextmanager
def attention_priority(backend: str, device: Any) -> Iterator[None]:
    """Around every generation, also while compiling, so traced graphs pick the same kernel."""
    if backend != SDPA_CUDNN or device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    try:
        context = sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: cuDNN becomes one of the allowed kernels
        context = sdpa_kernel(order)
    with context:
        yield
