"""Choosing the compute dtype; `auto` decides by measuring this machine, never by assumption."""
from __future__ import annotations

import functools
import logging
import time

import torch

logger = logging.getLogger(__name__)

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested in _NAMES:
        return _NAMES[requested]
    if requested != "auto":
        raise ValueError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return matmul_rule_dtype(*cpu_matmul_seconds())


def matmul_rule_dtype(fp32_seconds: float, bf16_seconds: float) -> torch.dtype:
    """bf16 only where a decode-shaped matmul in bf16 beats fp32 by a clear margin (>= 1.3x): the rule
    for steps auto does not time whole, and auto_setting's first candidate where it times them."""
    return torch.bfloat16 if bf16_seconds * 1.3 < fp32_seconds else torch.float32


@functools.lru_cache(maxsize=1)
def cpu_matmul_seconds() -> tuple[float, float]:
    """Seconds of one decode-shaped matmul (32 x 576 by 576 x 1536) in fp32 and in bf16.

    On AVX2-only CPUs torch's bf16 matmul is ~100x slower than fp32; on AVX-512-BF16/AMX
    ones it is faster. The measurement takes a few ms (bf16 is cut short when slow).
    """
    x32 = torch.randn(32, 576)
    w32 = torch.randn(1536, 576)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = x32.to(dtype), w32.to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up
        start = time.perf_counter()
        reps = 0
        while reps < 20 and time.perf_counter() - start < 0.05:
            torch.nn.functional.linear(x, w)
            reps += 1
        timings[dtype] = (time.perf_counter() - start) / reps
    logger.info("CPU matmul 32 x 576 x 1536: fp32 %.3f ms, bf16 %.3f ms",
                timings[torch.float32] * 1e3, timings[torch.bfloat16] * 1e3)
    return timings[torch.float32], timings[torch.bfloat16]
