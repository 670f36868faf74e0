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


def _processor_class() -> type:
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    class RealRopeAttnProcessor(ZSingleStreamAttnProcessor):
        """ZSingleStreamAttnProcessor.__call__ of diffusers 0.42.1 with ``rotate``."""

        def __call__(
            self,
            attn: Any,
            hidden_states: Any,
            encoder_hidden_states: Any = None,
            attention_mask: Any = None,
            freqs_cis: Any = None,
        ) -> Any:
            query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
            key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
            value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if freqs_cis is not None:
                query = rotate(query, freqs_cis)
                key = rotate(key, freqs_cis)
            dtype = query.dtype
            if attention_mask is not None and attention_mask.ndim == 2:
                attention_mask = attention_mask[:, None, None, :]
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            out = attn.to_out[0](out.flatten(2, 3).to(dtype))
            if len(attn.to_out) > 1:  # dropout
                out = attn.to_out[1](out)
            return out

    return RealRopeAttnProcessor


def use_real_rope(transformer: Any) -> int:
    """Switch every Z-Image attention of ``transformer`` to the real-valued rotation, in
    place, before compiling. Keeps each processor's attention backend. Returns how many
    attention modules were switched (0: not a Z-Image transformer, nothing changed)."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    if isinstance(transformer.rope_embedder, _RealRopeEmbedder):
        return 0
    cls = _processor_class()
    switched = 0
    for module in transformer.modules():
        old = getattr(module, "processor", None)
        if type(old) is ZSingleStreamAttnProcessor:
            new = cls()
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            module.processor = new
            switched += 1
    if switched:
        transformer.rope_embedder = _RealRopeEmbedder(transformer.rope_embedder)
    log.info("real-valued RoPE in %d attention modules", switched)
    return switched
