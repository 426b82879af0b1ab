"""Group-quantised weights in the C kernels' block layout, for decode steps of 1-8 rows on the CPU
(`quantization="int4"` or `"int8"` with `kernels="cpu"`; asyncllm/kernels/cpu/quant_rows_impl.h).

torch's int4 CPU kernel (layers/int4.py) computes in bf16 and, at one row, left ~6 ms of a
~14 ms step to the ops around it. This layout is read by a C kernel with fp32 (or bf16)
activations, which also runs inside the one-call decoder (model/cpu_decode.py), and takes 8-bit
blocks too: the logits weight (~113 MB in fp32 for the default model, a fifth of what a step
reads) is read at 1.125 bytes per parameter under either setting, and under "int8" the
projections too (lossy where the weights were not 8-bit already, but far closer than 4 bits).

One row of the weight is a run of blocks, one per GROUP_SIZE input columns:
  4 bits (Q4_1): fp32 scale, fp32 min, 16 bytes; byte j = code of column j | code of column j+16 << 4
  8 bits (Q8_0): fp32 scale, 32 signed bytes
  8-bit floats (FP8_BITS: FP8 checkpoints, quantization="fp8"): fp32 scale, 32 e4m3 bytes
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.ops import Ops
from asyncllm.model.layers.int4 import FP8_BITS, GROUP_SIZE, GroupQuantized, int4_shape_supported, \
    quantize_groups, quantize_groups_fp8, quantize_groups_int8

BLOCK_BYTES = {4: 8 + GROUP_SIZE // 2, 8: 4 + GROUP_SIZE, FP8_BITS: 4 + GROUP_SIZE}
_QUANTIZERS = {4: quantize_groups, 8: quantize_groups_int8, FP8_BITS: quantize_groups_fp8}


MAX_ROWS = cpu_kernels.FEW_ROWS_MAX  # activation rows the kernel's tiles take


def block_quant_supported(weight: torch.Tensor) -> bool:
    """Whether the C kernel takes this weight [n, k] (whole groups along k, 16-row tiles along n)
    and its activations (the model's dtype: fp32 or bf16, on the CPU)."""
    return (weight.dim() == 2 and int4_shape_supported(*weight.shape) and cpu_kernels.supports(weight))


# EngineArgs.quantization → bits of the projections' copies ("fp8" of a dense checkpoint: e4m3 blocks)
QUANTIZATION_BITS = {"int4": 4, "int8": 8, "fp8": FP8_BITS}

# bf16 models read 8-bit blocks for steps of up to this many rows: measured on the default model's
# 120 projections, 4.6 / 5.6 / 6.9 / 13.4 ms at 1 / 2 / 4 / 8 rows against a flat ~11 ms for
# oneDNN's packed bf16 weights on an AMX CPU (an AMD EPYC without AMX: 3.5 / 3.4 / 4.4 / 7.6
# against ~7); fp32 ones: 4.9 / 4.9 / 6.8 / 9.2 against the few-rows kernel's 16.2-18.9 ms, so
# every row count the kernel takes.
BF16_MAX_ROWS = 4
# On the Triton kernels (CUDA) the blocks serve every step (asyncllm_kernels.block_linear tiles any
# row count): the dense weight is never needed.
TRITON_ROWS = 1 << 62


def block_rows(weight: torch.Tensor, ops: Ops, bits: int) -> int:
    """Most rows of the steps that read blocks of `bits` made from this weight under
    `quantization` (0: none). On the C kernels fp32 models read them for every step the kernel
    takes (MAX_ROWS), bf16 ones 8-bit and e4m3 blocks up to BF16_MAX_ROWS (bf16 models keep torch's
    int4 kernel for 4 bits); on the Triton kernels every step reads them (TRITON_ROWS)."""
    if ops.triton:
        return TRITON_ROWS if weight.dim() == 2 and int4_shape_supported(*weight.shape) else 0
    if not ops.c_kernels or not block_quant_supported(weight):
        return 0
    if weight.dtype == torch.float32:
        return MAX_ROWS
    return BF16_MAX_ROWS if bits in (8, FP8_BITS) else 0


def logits_block_rows(weight: torch.Tensor, ops: Ops, bits: int) -> int:
    """Most rows of the steps that read an 8-bit copy of the logits weight when the projections
    are quantised to `bits` (0: none): it has one where they get C blocks, read as 8-bit blocks
    are (block_rows). Not on the Triton kernels: the copy is for the CPU's memory bandwidth."""
    return block_rows(weight, ops, 8) if block_rows(weight, ops, bits) and not ops.triton else 0


def _as_bytes(values: torch.Tensor) -> torch.Tensor:
    """[n, groups] fp32 → [n, groups, 4] of their bytes."""
    return values.contiguous().unsqueeze(-1).view(torch.uint8)


@dataclass
class BlockQuantWeight:
    """A projection weight as blocks of `bits`-bit codes, with the matmul of few rows that reads it."""
    blocks: torch.Tensor  # [out_features, in_features / GROUP_SIZE * BLOCK_BYTES[bits]] uint8
    bits: int
    in_features: int
    exact: bool = False  # the blocks give back the weight they were made from bit for bit

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int) -> "BlockQuantWeight":
        """By the Q4_1 (4 bits) or Q8_0 (8 bits) rule, in C when the kernels are built (the same
        codes and scales, ~10x faster: ~0.15 s instead of 1.6 s for the default model)."""
        if bits not in BLOCK_BYTES:
            raise ValueError(f"bits must be 4, 8 or {FP8_BITS} (fp8), got {bits}")
        if (bits != FP8_BITS and weight.device.type == "cpu" and weight.dtype == torch.float32
                and weight.dim() == 2 and weight.stride(-1) == 1
                and int4_shape_supported(*weight.shape) and cpu_kernels.build_error() is None):
            blocks, misses = cpu_kernels.quantize_blocks(weight.detach(), bits, BLOCK_BYTES[bits])
            return cls(blocks, bits, weight.shape[1], exact=misses == 0)
        quantized = cls.from_groups(_QUANTIZERS[bits](weight))
        quantized.exact = torch.equal(quantized.dequantize(), weight.detach().float())
        return quantized

    @classmethod
    def from_groups(cls, q: GroupQuantized) -> "BlockQuantWeight":
        n, k = q.codes.shape
        codes = q.codes.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
        if q.bits == 4:
            packed = (codes[..., :GROUP_SIZE // 2] | (codes[..., GROUP_SIZE // 2:] << 4)).to(torch.uint8)
            parts = [_as_bytes(q.scale), _as_bytes(q.low), packed]
        else:  # a signed byte (Q8_0) or an e4m3 byte
            parts = [_as_bytes(q.scale), codes.to(torch.int8 if q.bits == 8 else torch.uint8).view(torch.uint8)]
        return cls(torch.cat(parts, dim=-1).reshape(n, -1).contiguous(), q.bits, k)

    def groups(self) -> GroupQuantized:
        """The codes, scales and minimums back out of the blocks (what the kernel reads)."""
        n, k = self.out_features, self.in_features
        blocks = self.blocks.reshape(n, k // GROUP_SIZE, BLOCK_BYTES[self.bits])
        scale = blocks[..., 0:4].contiguous().view(torch.float32)[..., 0]
        if self.bits == 4:
            low = blocks[..., 4:8].contiguous().view(torch.float32)[..., 0]
            packed = blocks[..., 8:].to(torch.int32)
            codes = torch.cat([packed & 15, packed >> 4], dim=-1)
        else:
            low = torch.zeros_like(scale)
            codes = blocks[..., 4:].contiguous().view(torch.int8 if self.bits == 8 else torch.uint8).to(torch.int32)
        return GroupQuantized(codes.reshape(n, k), scale, low, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The weight as the kernel computes it: each w = code * scale + min rounded once."""
        return self.groups().rounded_once()

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids` (any shape) → [*ids.shape, in_features] fp32, as dequantize() has them
        (an embedding kept as blocks)."""
        rows = BlockQuantWeight(self.blocks.index_select(0, ids.reshape(-1)), self.bits, self.in_features)
        return rows.dequantize().reshape(*ids.shape, self.in_features)

    def linear_many_rows(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in_features] fp32 → x @ dequantize()^T (+ bias), for any row count, as the panel
        GEMM computes it (what the other steps take when only the blocks are kept: Linear.drop_dense)."""
        return cpu_kernels.panel_linear_blocks(x, self.blocks, self.bits, self.out_features, bias)

    def linear_triton(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] → [rows, out_features] in x's dtype, by asyncllm_kernels.block_linear
        (CUDA; Triton's interpreter in the tests)."""
        from asyncllm_kernels import block_linear

        return block_linear(x, self.blocks, self.bits, self.out_features)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows <= MAX_ROWS, in_features] (fp32 or bf16) → [rows, out_features] in x's dtype."""
        return cpu_kernels.linear_quant_rows(x, self.blocks, self.bits, self.out_features, self.in_features)
