"""Lossless speed-ups, each selected by configuration.

- ``compile``: ``torch.compile`` of the transformer's repeated blocks (regional
  compilation: one compiled graph serves all 30 main layers, so start-up compiles a block
  once instead of the whole model) and of the VAE decoder. The math is the same; only
  kernel fusion and bf16 rounding order change.
- ``sdpa_cudnn``: cuDNN's fused attention first in PyTorch's SDPA priority list, with
  flash / memory-efficient / math as fallbacks for inputs cuDNN cannot take. The choice
  is made while tracing; changing it between restarts may reuse graphs from the on-disk
  compile cache traced with the other kernel (both exact, only the speed differs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from zimage_pipeline.engine.config import SDPA_CUDNN

log = logging.getLogger(__name__)


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
    log.info("torch.compile enabled (mode=%s): transformer blocks and VAE decoder", mode)


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
