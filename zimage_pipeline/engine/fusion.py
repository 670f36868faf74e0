"""Fused projections in Z-Image's transformer blocks (``engine.fuse_projections``).

Every block computes four GEMMs on the same input pair by pair: q, k and v from the
attention's input, and the FFN's w1 and w3 from its input. Concatenating the weight
matrices along the output dimension gives one GEMM each (N = 3 x 3840 and 2 x 10240
instead of 3840 and 10240): the input is read once, one launch instead of three or two,
and the larger N tiles the GPU's SMs in fewer partial waves. Every output element is the
same dot product over the same K; only the kernel cuBLAS picks for the larger shape, and
with it the rounding of the float32 accumulation, may change.

The separate modules are replaced (not kept beside the fused ones), so the weights take
the same memory as before. ``unfuse_projections`` splits them back (the benchmark's A/B).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

_BLOCK_CLASS = "ZImageTransformerBlock"


def _concat_linear(parts: list[Any]) -> Any:
    """One nn.Linear whose output is the parts' outputs side by side."""
    import torch
    from torch import nn

    first = parts[0]
    with_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(p.out_features for p in parts),
        bias=with_bias,
        device="meta",  # no random initialisation of a matrix that is overwritten next
        dtype=first.weight.dtype,
    )
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if with_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def _split_linear(fused: Any, sizes: list[int]) -> list[Any]:
    from torch import nn

    weights = fused.weight.detach().split(sizes)
    biases = fused.bias.detach().split(sizes) if fused.bias is not None else [None] * len(sizes)
    parts = []
    for weight, bias in zip(weights, biases, strict=True):
        part = nn.Linear(
            fused.in_features,
            weight.shape[0],
            bias=bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        part.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if bias is not None:
            part.bias = nn.Parameter(bias.clone(), requires_grad=False)
        parts.append(part)
    return parts


@functools.cache
def fused_feed_forward_class() -> type:
    """One class for the process (torch is imported lazily)."""
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
    from torch import nn

    class FusedFeedForward(nn.Module):
        """diffusers' FeedForward, ``w2(silu(w1 x) * w3 x)``, with w1 and w3 as one GEMM."""

        def __init__(self, w13: nn.Linear, w2: nn.Linear) -> None:
            super().__init__()
            self.w13 = w13
            self.w2 = w2

        def forward(self, x: Any) -> Any:
            x1, x3 = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(x1) * x3)

    return FusedFeedForward


def _blocks(transformer: Any) -> list[Any]:
    return [m for m in transformer.modules() if type(m).__name__ == _BLOCK_CLASS]


def fuse_projections(transformer: Any) -> int:
    """Fuse q/k/v and w1/w3 in every Z-Image block, in place, before compiling; installs
    the engine's attention processor, which uses ``to_qkv`` when present. Idempotent.
    Returns how many blocks were fused now."""
    from zimage_pipeline.engine.attention import install_processor

    install_processor(transformer)
    ff_class = fused_feed_forward_class()
    fused = 0
    for block in _blocks(transformer):
        attn = block.attention
        if getattr(attn, "to_qkv", None) is None:
            parts = [attn.to_q, attn.to_k, attn.to_v]
            attn.qkv_split = [p.out_features for p in parts]
            attn.to_qkv = _concat_linear(parts)
            del attn.to_q, attn.to_k, attn.to_v  # the fused copy replaces them
            attn.fused_projections = True
            fused += 1
        ff = block.feed_forward
        if not isinstance(ff, ff_class):
            block.feed_forward = ff_class(_concat_linear([ff.w1, ff.w3]), ff.w2)
    log.info("fused q/k/v and w1/w3 projections in %d blocks", fused)
    return fused


def unfuse_projections(transformer: Any) -> int:
    """Split the fused projections back into diffusers' modules (same weights). Returns
    how many blocks were split."""
    import torch
    from diffusers.models.transformers.transformer_z_image import FeedForward

    ff_class = fused_feed_forward_class()
    split = 0
    for block in _blocks(transformer):
        attn = block.attention
        if getattr(attn, "to_qkv", None) is not None:
            attn.to_q, attn.to_k, attn.to_v = _split_linear(attn.to_qkv, attn.qkv_split)
            del attn.to_qkv
            attn.fused_projections = False
            split += 1
        ff = block.feed_forward
        if isinstance(ff, ff_class):
            fused_ff: Any = ff
            hidden = fused_ff.w13.out_features // 2
            with torch.device("meta"):  # every weight is replaced next
                plain = FeedForward(dim=fused_ff.w2.out_features, hidden_dim=hidden)
            plain.w1, plain.w3 = _split_linear(fused_ff.w13, [hidden, hidden])
            plain.w2 = fused_ff.w2
            block.feed_forward = plain
    return split
