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
    """auto = bfloat16 on GPUs that support it, float16 on other GPUs; on CPU bfloat16 where
    the CPU has native bf16 instructions (AVX512-BF16/AMX), else float32.

    Measured with benchmarks/generation.py on a 2-core AVX512-BF16 machine: bf16 cuts the
    time to first token of a 1,500-token prompt about 2.7x and decodes as fast or faster.
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
