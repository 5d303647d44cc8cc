"""Device and dtype resolved once, from settings."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """auto = CUDA, then Apple MPS, then CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto = bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU.

    float32 on CPU: on this class of machine bf16 prefill is faster but decoding is not,
    and answers are decode-bound (see benchmarks/generation.py).
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32
