"""Real-valued rotary embeddings for Z-Image's transformer (``engine.real_rope``).

diffusers 0.42.1 applies RoPE with complex64 tensors (``view_as_complex(q) * freqs_cis``).
Inductor generates no code for complex operators, so inside every compiled block the
rotation falls back to separate eager kernels (upcast, complex multiply, view back, cast)
for q and k of all 34 layers. Here the same rotation is written with real tensors:

    (a + ib)(c + id) = (ac - bd) + i(ad + bc)

computed in float32 as diffusers does, then cast back, so inductor fuses it with the
QK-norm around it. The math is the same; only float32 rounding order may differ (fused
multiply-add), far below the bf16 rounding that follows.

The frequencies stay complex in the un-compiled part of the model; only what reaches the
blocks changes: ``rope_embedder`` returns ``view_as_real(freqs_cis)`` (``[..., d/2, 2]``
float32), which pads, slices and concatenates exactly as the complex tensor did.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class _RealRopeEmbedder:
    """Wraps diffusers' RopeEmbedder; same table, real view."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, ids: Any) -> Any:
        import torch

        return torch.view_as_real(self.inner(ids))

    def __getattr__(self, name: str) -> Any:  # axes_dims, theta, ... as before
        return getattr(self.inner, name)


def rotate(x_in: Any, freqs: Any) -> Any:
    """RoPE of ``x_in`` ``[B, L, H, D]`` by ``freqs`` ``[B, L, D/2, 2]`` (cos, sin pairs)."""
    x = x_in.float().unflatten(-1, (-1, 2))
    f = freqs.unsqueeze(2)
    a, b = x[..., 0], x[..., 1]
    c, d = f[..., 0], f[..., 1]
    import torch

    return torch.stack((a * c - b * d, a * d + b * c), dim=-1).flatten(3).type_as(x_in)


def use_real_rope(transformer: Any) -> int:
    """Switch every Z-Image attention of ``transformer`` to the real-valued rotation, in
    place, before compiling: the engine's processor (attention.py) rotates with ``rotate``
    when the table it receives is real. Returns how many attention modules use the engine's
    processor after this call (0: already switched, or not a Z-Image transformer)."""
    from zimage_pipeline.engine.attention import install_processor, processor_class

    if isinstance(transformer.rope_embedder, _RealRopeEmbedder):
        return 0
    install_processor(transformer)
    cls = processor_class()
    switched = sum(
        1 for module in transformer.modules() if type(getattr(module, "processor", None)) is cls
    )
    if switched:
        transformer.rope_embedder = _RealRopeEmbedder(transformer.rope_embedder)
    log.info("real-valued RoPE in %d attention modules", switched)
    return switched


def undo_real_rope(transformer: Any) -> None:
    """The complex table again (the processor then takes diffusers' complex path)."""
    if isinstance(transformer.rope_embedder, _RealRopeEmbedder):
        transformer.rope_embedder = transformer.rope_embedder.inner
