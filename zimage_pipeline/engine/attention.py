"""The engine's attention processor for Z-Image's transformer blocks.

diffusers 0.42.1's ``ZSingleStreamAttnProcessor.__call__``, unchanged in its math, with two
lossless options that the rest of the engine switches on:

- real-valued RoPE (rope.py): when the blocks receive the rotary table as real
  ``[..., d/2, 2]`` pairs instead of complex numbers, the rotation is written with real
  tensors so that inductor can fuse it; complex tables still take diffusers' path.
- fused Q/K/V (fusion.py): when the attention module carries one ``to_qkv`` projection
  (the three weight matrices concatenated), one GEMM computes all three outputs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


def complex_rotate(x_in: Any, freqs_cis: Any) -> Any:
    """diffusers 0.42.1's ``apply_rotary_emb``: complex64 multiply, float32, cast back."""
    import torch

    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


@functools.cache
def processor_class() -> type:
    """Built on first use (diffusers is imported lazily); one class for the process, so
    ``type(p) is processor_class()`` identifies the engine's processors."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    from zimage_pipeline.engine.rope import rotate

    class TurboAttnProcessor(ZSingleStreamAttnProcessor):
        """ZSingleStreamAttnProcessor.__call__ of diffusers 0.42.1, with the two options."""

        def __call__(
            self,
            attn: Any,
            hidden_states: Any,
            encoder_hidden_states: Any = None,
            attention_mask: Any = None,
            freqs_cis: Any = None,
        ) -> Any:
            fused = getattr(attn, "to_qkv", None)
            if fused is not None:
                # Views into one [B, L, q+k+v] output; each column is the dot product the
                # separate projection computed.
                query, key, value = fused(hidden_states).split(attn.qkv_split, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key = attn.to_k(hidden_states)
                value = attn.to_v(hidden_states)
            query = query.unflatten(-1, (attn.heads, -1))
            key = key.unflatten(-1, (attn.heads, -1))
            value = value.unflatten(-1, (attn.heads, -1))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if freqs_cis is not None:
                rotation = complex_rotate if freqs_cis.is_complex() else rotate
                query = rotation(query, freqs_cis)
                key = rotation(key, freqs_cis)
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

    return TurboAttnProcessor


def install_processor(transformer: Any) -> int:
    """Give every Z-Image attention of ``transformer`` the engine's processor, in place,
    before compiling; keeps each one's attention backend. Idempotent. Returns how many
    processors were replaced now (0: already installed, or not a Z-Image transformer)."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    cls = processor_class()
    switched = 0
    for module in transformer.modules():
        old: Any = getattr(module, "processor", None)
        if type(old) is ZSingleStreamAttnProcessor:
            new: Any = cls()
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            module.processor = new
            switched += 1
    if switched:
        log.info("engine attention processor in %d attention modules", switched)
    return switched


def restore_processor(transformer: Any) -> int:
    """Back to diffusers' own processor (the benchmark's A/B in one process). Only valid
    with unfused projections and a complex rotary table. Returns how many were restored."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    cls: Any = processor_class()
    restored = 0
    for module in transformer.modules():
        old: Any = getattr(module, "processor", None)
        if type(old) is cls:
            new: Any = ZSingleStreamAttnProcessor()  # type: ignore[no-untyped-call]
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            module.processor = new
            restored += 1
    return restored
