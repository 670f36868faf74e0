"""Telling a CUDA out-of-memory (recoverable) from a sticky CUDA error (fatal)."""

from __future__ import annotations

import gc
from enum import Enum

# After these the CUDA context is corrupt: every later kernel fails, so the process must go.
_STICKY_MARKERS = (
    "CUDA error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ECC",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "CUDA driver error",
)


class FailureKind(Enum):
    OUT_OF_MEMORY = "oom"
    STICKY_DEVICE = "sticky"
    OTHER = "other"


def classify(exc: BaseException) -> FailureKind:
    import torch

    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)
    ):
        return FailureKind.OUT_OF_MEMORY
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if (accelerator_error is not None and isinstance(exc, accelerator_error)) or any(
        marker in text for marker in _STICKY_MARKERS
    ):
        return FailureKind.STICKY_DEVICE
    return FailureKind.OTHER


def free_device_memory() -> None:
    """Return cached blocks to the driver after an OOM. Call it outside the ``except``
    block: the exception's traceback pins the failed batch's activations until then."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
