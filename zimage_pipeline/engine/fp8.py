"""FP8 linear layers in Z-Image's transformer blocks (``engine.linear_fp8``): LOSSY, opt-in.

Off by default. Every other speed-up of the engine computes the same function as diffusers
up to bf16 rounding; this one does not. The blocks' projections (q/k/v, attention output,
FFN) run as float8 (e4m3) GEMMs on the GPU's FP8 tensor cores:

- weights quantized once, per output row: ``scale = max|row| / 448``;
- activations quantized on every call, per token (row), the same way;
- ``torch._scaled_mm`` multiplies the two in FP8 with float32 accumulation and applies
  both scales, output in the model's dtype (bf16).

e4m3 keeps 3 mantissa bits, so each operand carries up to ~6 % relative rounding error
(about 2 % on average); the outputs differ from the bf16 model's visibly more than bf16
rounding does. The benchmark reports the measured error against eager diffusers next to the
speed (bench/NOTES.md, round 4), and the lossless checks do not apply to this tier.

Why it can pay on an H100 at all: the bf16 GEMMs already run at the matrix rate and the
card sits at its power cap under load (bench/NOTES.md, round 4); FP8 halves the bytes and
the energy per multiply. Embeddings, modulation, norms and the final layer stay in bf16.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

_BLOCK_CLASS = "ZImageTransformerBlock"
_PARTS = ("attention", "feed_forward")  # the block's GEMMs; adaLN_modulation has M = batch
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_rows(values: Any) -> tuple[Any, Any]:
    """``values`` [M, K] as float8_e4m3fn with one float32 scale per row ([M, 1]), so that
    ``q.float() * scale`` approximates ``values``."""
    import torch

    wide = values.float()
    scale = wide.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@functools.cache
def fp8_linear_class() -> type:
    """One class for the process (torch is imported lazily)."""
    import torch
    from torch import nn

    class Fp8Linear(nn.Module):
        """nn.Linear with float8 weights and per-token float8 activations (lossy)."""

        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            self.out_dtype = linear.weight.dtype
            q, scale = quantize_rows(linear.weight.detach())
            self.register_buffer("weight_fp8", q)  # [N, K]
            self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, N] float32
            bias = linear.bias
            self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features)
            xq, x_scale = quantize_rows(rows)
            weight_fp8: Any = self.weight_fp8  # buffers: typed as Tensor | Module
            weight_scale: Any = self.weight_scale
            if rows.is_cuda:
                scaled_mm: Any = torch._scaled_mm  # private, unannotated
                out = scaled_mm(
                    xq,
                    weight_fp8.t(),  # column-major [K, N], as the FP8 GEMM needs
                    scale_a=x_scale,
                    scale_b=weight_scale,
                    out_dtype=self.out_dtype,
                )
            else:  # the same product, dequantized: CPUs have no FP8 GEMM (tests)
                weight = weight_fp8.float() * weight_scale.t()
                out = ((xq.float() * x_scale) @ weight.t()).to(self.out_dtype)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

    return Fp8Linear


def supports_fp8(device: Any) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper); the CPU path is
    the dequantized reference."""
    import torch

    if device.type != "cuda":
        return True
    return bool(torch.cuda.get_device_capability(device) >= (8, 9))


def quantize_linears(transformer: Any) -> int:
    """Replace every nn.Linear in the blocks' attention and feed-forward (after
    fuse_projections, if on) with Fp8Linear, in place, before compiling. The bf16 weights
    are dropped. Idempotent. Returns how many layers were replaced now."""
    from torch import nn

    cls = fp8_linear_class()
    replaced = 0
    for block in (m for m in transformer.modules() if type(m).__name__ == _BLOCK_CLASS):
        for part in _PARTS:
            root = getattr(block, part, None)
            if root is None:
                continue
            targets = [
                (name, module)
                for name, module in root.named_modules()
                if type(module) is nn.Linear and name
            ]
            for name, module in targets:
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, cls(module))
                replaced += 1
    log.warning("engine.linear_fp8: %d block projections run in FP8 (lossy)", replaced)
    return replaced


LOSSY_SUFFIX = "+fp8-lossy"


def runs_fp8(transformer: Any) -> bool:
    """Whether any layer of the transformer runs in FP8 (the option applied)."""
    cls = fp8_linear_class()
    return any(isinstance(m, cls) for m in transformer.modules())
