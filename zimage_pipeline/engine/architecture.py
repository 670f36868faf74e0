"""Random-weight Z-Image pipelines from the real classes: the tiny test model and the
full-size architecture the GPU benchmark times (random weights cost what real ones do).

Full-size facts: the transformer's diffusers defaults are the 6B model (dim 3840, 30
layers, 2+2 refiner layers, 30 heads, cap_feat_dim 2560); the text encoder is Qwen3-4B;
the VAE is Flux's AutoencoderKL (16 latent channels, no quant convs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zimage_pipeline.engine.tokenizer import build_tokenizer

SCHEDULER = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}


@dataclass(frozen=True)
class Architecture:
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))


def _vae(block_out: tuple[int, ...], layers: int, groups: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out),
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": groups,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
        "mid_block_add_attention": True,
    }


FULL = Architecture(
    transformer={},  # diffusers' defaults are the 6B model
    text_encoder={
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    vae=_vae((128, 256, 512, 512), layers=2, groups=32),
)

TINY = Architecture(
    transformer={
        "dim": 64,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "cap_feat_dim": 32,
        "axes_dims": [8, 12, 12],
    },
    text_encoder={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    vae=_vae((16, 16, 32, 32), layers=1, groups=8),
)


def build_random_pipeline(
    arch: Architecture, *, seed: int, dtype: Any = None, device: Any = "cpu"
) -> Any:
    """A ZImagePipeline with seeded random weights, built directly on ``device``."""
    import diffusers
    import torch
    import transformers

    # diffusers' own annotations are partial; treat its classes as Any here.
    lib: Any = diffusers
    hf: Any = transformers

    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    # Constructing in the target dtype on the target device avoids a float32 copy of
    # 10 B parameters in host memory for the full-size model.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = lib.ZImageTransformer2DModel(**arch.transformer)
            text_encoder = hf.Qwen3Model(hf.Qwen3Config(**arch.text_encoder))
            vae = lib.AutoencoderKL(**arch.vae)
    finally:
        torch.set_default_dtype(previous)
    for module in (transformer, text_encoder, vae):
        module.eval().requires_grad_(False)
    tokenizer = build_tokenizer()
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError("tokenizer is larger than the text encoder's vocabulary")
    return lib.ZImagePipeline(
        scheduler=lib.FlowMatchEulerDiscreteScheduler(**arch.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
