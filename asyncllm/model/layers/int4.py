"""4-bit weight copies read by small decode steps on the CPU (`EngineArgs.quantization="int4"`).

A decode step of one stream reads every projection weight once, so it is bound by memory
bandwidth: fp32 weights cost 4 bytes per parameter, a 4-bit copy with one bf16 scale and zero
per group of 32 costs ~0.6. torch's CPU kernel for that layout (`_weight_int4pack_mm_for_cpu`,
the one gpt-fast and torchao use) computes in bf16 and, measured here on the default model's
projection stack, runs 5.5x faster than fp32 at one row and 2.3x at eight, but it computes
row by row (1.2 ms per extra row), so prompts and larger batches keep using the dense weights.

Quantisation is llama.cpp's Q4_1 rule: per group of 32 input columns, scale = (max - min) / 15,
q = round((w - min) / scale). A weight that came from a Q4_1 GGUF is recovered exactly up to
the bf16 rounding of the scale and zero. torch's kernel dequantises as (q - 8) * scale + zero,
so zero = min + 8 * scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 32
FP8_BITS = 9  # GroupQuantized.bits of e4m3 codes (asyncllm.kernels.cpu.FP8_BITS)
FP8_MAX = 448.0  # e4m3fn's largest finite value
_INNER_K_TILES = 2  # the CPU kernel's packing parameter (2, 4 or 8; no measurable difference here)
COMPUTE_DTYPE = torch.bfloat16  # the kernel's only fast activation dtype (fp32 and fp16 fall back ~30x slower)


def int4_max_rows(model_dtype: torch.dtype) -> int:
    """Most rows a step may have for the 4-bit copy to beat the model's dense packed weights.
    Measured on the default model's projection stack: the 4-bit kernel costs 3.5 ms + ~1.2 ms
    per extra row, packed bf16 a flat ~10.5 ms up to 16 rows, packed fp32 19 ms + 0.6 ms/row."""
    return 8 if model_dtype == torch.bfloat16 else 16


def int4_supported(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_shape_supported(out_features: int, in_features: int) -> bool:
    """The kernel's layout needs whole groups along the input and 16-row tiles along the output."""
    return in_features % GROUP_SIZE == 0 and out_features % 16 == 0


@dataclass
class GroupQuantized:
    """A weight as integer codes with one scale (and, for 4 bits, one minimum) per group of
    GROUP_SIZE input columns: w ≈ codes * scale + low."""
    # codes: [out_features, in_features] int32 (uint8 / int8 from a GGUF): 0..15 (4 bits), -127..127
    # (8 bits), e4m3 bytes 0..255 (FP8_BITS: the value is the byte read as float8_e4m3fn)
    codes: torch.Tensor
    scale: torch.Tensor  # [out_features, in_features / GROUP_SIZE] fp32
    low: torch.Tensor    # same shape; zeros for 8 bits
    bits: int = 4

    @property
    def zero(self) -> torch.Tensor:
        """What torch's int4 kernel adds: w = (codes - 8) * scale + zero."""
        return self.low + 8 * self.scale

    @staticmethod
    def stack_rows(parts: "list[GroupQuantized]") -> "GroupQuantized":
        """Fused projections' parts one above the other."""
        return GroupQuantized(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                              torch.cat([p.low for p in parts]), parts[0].bits)

    def rounded_once(self) -> torch.Tensor:
        """The fp32 weight as the C block kernels compute with it: each w = code * scale + min,
        computed exactly and rounded once."""
        out_features, in_features = self.codes.shape
        codes = self.code_values().reshape(out_features, -1, GROUP_SIZE).double()
        exact = codes * self.scale.double()[..., None] + self.low.double()[..., None]
        return exact.float().reshape(out_features, in_features)

    def code_values(self) -> torch.Tensor:
        """What each code stands for before its scale (exact in fp32): the integer, or an e4m3 byte's float."""
        if self.bits == FP8_BITS:
            return self.codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
        return self.codes.float()

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        codes = self.code_values().reshape(out_features, -1, GROUP_SIZE)
        return (codes * self.scale[..., None] + self.low[..., None]).reshape(out_features, in_features)


def _groups(weight: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight.shape
    if not int4_shape_supported(out_features, in_features):
        raise ValueError(f"group quantisation needs in_features % {GROUP_SIZE} == 0 and out_features % 16 == 0, "
                         f"got a {out_features}x{in_features} weight")
    return weight.detach().float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)


def quantize_groups(weight: torch.Tensor) -> GroupQuantized:
    """[out_features, in_features] → 4-bit codes by the Q4_1 rule, groups along in_features."""
    groups = _groups(weight)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: all codes 0
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    return GroupQuantized(codes.to(torch.int32).reshape(weight.shape), scale, low)


def quantize_groups_int8(weight: torch.Tensor) -> GroupQuantized:
    """[out_features, in_features] → 8-bit codes by llama.cpp's Q8_0 rule: scale = max |w| / 127
    per group, code = round(w / scale). A weight that came from a Q8_0 GGUF (scales in fp16)
    comes back exactly."""
    groups = _groups(weight)
    scale = groups.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: codes 0
    codes = (groups / scale[..., None]).round().clamp(-127, 127)
    return GroupQuantized(codes.to(torch.int32).reshape(weight.shape), scale, torch.zeros_like(scale), bits=8)


def quantize_groups_fp8(weight: torch.Tensor) -> GroupQuantized:
    """[out_features, in_features] → e4m3 codes with one fp32 scale per group of 32 inputs (max |w| /
    448, so the largest weight of each group is e4m3's largest value; round to nearest even). The
    block layout has a scale per group anyway, so this costs nothing over vLLM's per-tensor or
    per-channel scales and loses less to e4m3's narrow range."""
    groups = _groups(weight)
    scale = groups.abs().amax(-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: codes 0
    values = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    codes = values.view(torch.uint8).to(torch.int32).reshape(weight.shape)
    return GroupQuantized(codes, scale, torch.zeros_like(scale), bits=FP8_BITS)


@dataclass
class Int4Weight:
    """A projection weight in the CPU kernel's layout, with its matmul."""
    packed: torch.Tensor            # the kernel's tiled layout of the 4-bit codes
    scales_and_zeros: torch.Tensor  # [in_features / GROUP_SIZE, out_features, 2] in COMPUTE_DTYPE
    exact = False  # scale and zero are held in bf16: never taken as the weight itself
    bits = 4

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int4Weight":
        return cls.from_groups(quantize_groups(weight))

    @classmethod
    def from_groups(cls, q: GroupQuantized) -> "Int4Weight":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes, _INNER_K_TILES)
        scales_and_zeros = torch.stack([q.scale.t(), q.zero.t()], dim=-1).contiguous().to(COMPUTE_DTYPE)
        return cls(packed, scales_and_zeros)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] in any float dtype → [rows, out_features] in x's dtype."""
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(COMPUTE_DTYPE), self.packed, GROUP_SIZE,
                                                         self.scales_and_zeros)
        return out.to(x.dtype)
