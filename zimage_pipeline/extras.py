"""The optional GPU stack: the control plane installs without it (an audit or console
host), the worker and `model make-tiny` need it (`pip install "zimage-pipeline[gpu]"`)."""

from __future__ import annotations

import importlib.util

from zimage_pipeline.errors import ConfigError

GPU_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "peft")


def missing_gpu_modules() -> list[str]:
    """The GPU stack's modules that cannot be imported here (found without importing)."""
    missing = []
    for name in GPU_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_gpu_stack(command: str) -> None:
    missing = missing_gpu_modules()
    if missing:
        raise ConfigError(
            f"`{command}` needs the GPU stack, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: install "
            '"zimage-pipeline[gpu]" (torch first, from the index for your CUDA version)'
        )
