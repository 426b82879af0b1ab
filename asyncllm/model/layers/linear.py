"""Linear layers whose weights can be pre-packed for oneDNN on the CPU.

MKL's sgemm is efficient for one row on Intel CPUs (gemv, bandwidth-bound) and for big prompt chunks, but at
the 2-64 rows of batched decoding it re-packs the weight every call: measured on this project's
CPUs, a decode-shaped layer stack took 36 ms at 8 rows against 17 ms at 1 row. oneDNN with the
weight reordered once into its blocked layout takes 25 ms at 8 rows and ~10% less at 64. One fp32
row keeps the plain weight (gemv beats the packed path there), so packing costs a second copy of
the projection weights: `EngineArgs.cpu_weight_prepack` turns it off. In bf16 the packed path
wins at one row too (AMX: the stack takes 10.4 ms packed against 16.4 ms with torch's bf16 gemv).

With the C kernels (`kernels="cpu"`), fp32 steps of 1-8 rows use `linear_few_rows` instead: it
streams each weight row once past all the rows (asyncllm/kernels/cpu). Such a step is bound by
reading the weights from memory, and on the default model's projection and logits weights
(~540 MB, from DRAM) it took 21.0 / 26.3 ms at 4 / 8 rows against oneDNN's 24.8 / 28.5 ms; at one
row it matches MKL's gemv on Intel and beats it 2.5-3.3x on AMD EPYC, where MKL's gemv is slow.

In bf16 with the C kernels every step, one row or a thousand, uses `panel_linear` on bf16 panels
(panel_gemm_bf16_impl.h: vdpbf16ps where the CPU has it, fp32 accumulation; not on AMX CPUs,
whose oneDNN tile path was not measured against it: cpu_kernels.bf16_kernels_serve): one
reduction order per output whatever the rows, so greedy bf16 output no longer depends on the batch or the
chunking (issue 26), and on AVX-512-BF16 it ran the default model's projection and logits
shapes 1.4x / 1.6x / 1.2x faster than oneDNN's packed bf16 at 1 / 8 / 64 rows, 0.96-0.98x at
512-1024.

Steps of more rows (batched decoding, prompt chunks) in fp32 with the C kernels use
`panel_linear` on a copy packed into column panels (asyncllm/kernels/cpu/panel_gemm_impl.h) in place of
oneDNN's packed copy: on the same stack it ran 1.2-1.4x faster at 16-64 rows (oneDNN left the
weight stream from DRAM unoverlapped with the arithmetic) and as fast at 1024.

With `EngineArgs.quantization` a Linear also holds a quantised copy that steps with few rows read
instead: 4- or 8-bit blocks in the C kernels' layout under `kernels="cpu"` (layers/block_quant.py),
else, for 4 bits, torch's int4 layout (layers/int4.py, bf16 arithmetic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers import block_quant
from asyncllm.model.layers.block_quant import BlockQuantWeight
from asyncllm.model.layers.int4 import GroupQuantized, Int4Weight
from asyncllm.model.layers.ops import TORCH_OPS, Ops
from asyncllm.model.parallel import SINGLE, ParallelContext

_PACK_HINT = 8  # rows the blocked layout is tuned for; it serves any row count (measured 1-64)


def prepack_supported(device: torch.device, dtype: torch.dtype, ops: Ops = TORCH_OPS) -> bool:
    if device.type == "cpu" and ops.c_kernels and dtype in (torch.float32, torch.bfloat16):
        return True  # the C kernels' panels, any x86 or Arm CPU
    if dtype == torch.bfloat16 and not cpu_kernels.library.cpu_has_onednn_bf16():
        return False  # oneDNN cannot pack bf16 on this CPU (AVX2 only)
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


class PackedLinear:
    """The optional packed copy of a weight, and the matmul that uses it. The copy is column panels
    for the C kernels' `panel_linear` (fp32, `kernels == "cpu"`: steps of >= PANEL_MIN_ROWS rows;
    fewer take the C few-rows kernel on the plain weight), else oneDNN's blocked layout (fp32
    from 2 rows, bf16 from 1; plain F.linear below). Without a copy, fp32 steps of 1-8 rows on
    the C kernels take the few-rows kernel. Not an nn.Module: the packed tensor is a CPU-only
    cache of the weight, never a parameter, buffer or checkpoint entry."""

    def __init__(self, ops: Ops = TORCH_OPS):
        self.packed: torch.Tensor | None = None  # oneDNN's layout
        self.panels: torch.Tensor | None = None  # panel_linear's layout
        self.min_rows = 2
        self.ops = ops
        self.out_features = 0  # the packed weight's rows (the plain weight may be freed once packed)

    def pack(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        if self.ops.c_kernels and cpu_kernels.panel_weight_supported(weight) and (
                weight.dtype == torch.float32 or cpu_kernels.bf16_kernels_serve()):
            self.panels, self.packed = cpu_kernels.pack_panels(weight.detach()), None
        else:
            self.packed, self.panels = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_HINT), None
        self.min_rows = 1 if weight.dtype == torch.bfloat16 else 2

    @property
    def is_packed(self) -> bool:
        return self.packed is not None or self.panels is not None

    def _takes_panels(self, x: torch.Tensor) -> bool:
        """Whether a step of these rows reads the panel copy (the C kernels, fp32 or bf16): from
        PANEL_MIN_ROWS rows, i.e. every step, so a row's result never depends on the step's size."""
        return self.panels is not None and x.dim() == 2 and x.shape[0] >= cpu_kernels.PANEL_MIN_ROWS

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._takes_panels(x):
            return cpu_kernels.panel_linear(x, self.panels, self.out_features, bias)
        # fp32 only (bf16's packed AMX path is faster). One row too: MKL's gemv is no faster on
        # Intel and 2.5-3.3x slower on AMD EPYC (projections 26 vs 10 ms, logits 6.7 vs 2.0 ms).
        if self.ops.c_kernels and x.dtype == torch.float32 and cpu_kernels.few_rows_supported(x, weight):
            out = cpu_kernels.linear_few_rows(x, weight)
            return out if bias is None else out + bias
        if x.dim() == 2 and x.shape[0] >= self.min_rows:
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, weight, bias)

    @property
    def serves_every_step(self) -> bool:
        """The panel copy takes steps of every row count (PANEL_MIN_ROWS = 1, 2-D inputs): the
        plain weight is then a second copy of the same values that no step reads."""
        return self.panels is not None and cpu_kernels.PANEL_MIN_ROWS <= 1

    def silu_and_mul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """silu(gate) * up of the fused gate/up projection in one pass over the panels (the same bits
        as linear() then cpu_kernels.silu_and_mul), or None where that kernel does not serve: no
        panel copy, fewer than PANEL_MIN_ROWS rows, or halves that are not whole panels."""
        if not self._takes_panels(x) or self.panels.dtype != torch.float32 or \
                self.out_features % (2 * self.panels.shape[2]):
            return None
        return cpu_kernels.panel_linear_silu(x, self.panels, self.out_features, bias)


class Linear(nn.Linear):
    """nn.Linear that uses its packed copy once `pack()` was called, and its quantised copy for steps
    of at most `quantized_max_rows` rows once `quantize()` was."""

    shard_dim: int | None = None  # the weight dimension split over tensor-parallel ranks (None: replicated)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ops: Ops = TORCH_OPS):
        super().__init__(in_features, out_features, bias=bias)
        self.prepacked = PackedLinear(ops)
        self.quantized: Int4Weight | BlockQuantWeight | None = None
        self.quantized_max_rows = 0
        self.lora = None  # a LoRAProjection once the worker enables LoRA (asyncllm/lora/layers.py)
        # A packed checkpoint's exact groups of this weight, by first row (fused parts), until
        # every row has come (take_checkpoint_groups turns them into the blocks).
        self.checkpoint_groups: dict[int, GroupQuantized] = {}

    def pack(self) -> None:
        """The packed copy (after quantisation: a projection kept only as blocks is not packed).
        Where its panels serve every step and no quantised copy needs the dense weight, the plain
        weight is freed: the panels hold the same values, and keeping both doubled the dense
        model's memory (fp32 default model: 424 MB of projections held twice)."""
        if self.dense_dropped or self.weight_in_panels:
            return  # nothing to pack from: blocks alone, or packed already
        self.prepacked.pack(self.weight)
        if self.quantized is None and self.prepacked.serves_every_step:
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device),
                                       requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        """The weight [out, in] the steps compute with, wherever it lives: the plain weight, its
        panel copy (unpacked) or, with only blocks kept, the blocks' values."""
        if self.weight_in_panels:
            return cpu_kernels.unpack_panels(self.prepacked.panels, self.out_features)
        if self.dense_dropped:
            return self.quantized.dequantize()
        return self.weight.detach()

    @property
    def weight_in_panels(self) -> bool:
        """The weight lives in its panel copy alone (pack() freed the plain one)."""
        return self.weight.numel() == 0 and self.quantized is None and self.prepacked.panels is not None

    def take_checkpoint_groups(self, first_row: int, groups: GroupQuantized, keep_dense: bool) -> None:
        """Rows [first_row, first_row + n) of the weight as a checkpoint's exact groups. Once every
        row has come as groups they become the C blocks (where the kernels read such blocks at this
        dtype), and the dense weight is written only if it is kept (`keep_dense`) or the blocks
        cannot serve every step alone; rows whose projection is not all groups are written by
        finish_checkpoint_groups()."""
        self.checkpoint_groups[first_row] = groups
        if sum(g.codes.shape[0] for g in self.checkpoint_groups.values()) < self.out_features:
            return
        if self._adopt(self.checkpoint_groups) and not keep_dense and self.can_drop_dense:
            self.checkpoint_groups = {}
            self.drop_dense()
            return
        self.finish_checkpoint_groups()

    @torch.no_grad()
    def finish_checkpoint_groups(self) -> None:
        """After the load: rows still held as groups are written into the dense weight."""
        for first_row, groups in sorted(self.checkpoint_groups.items()):
            self.weight[first_row:first_row + groups.codes.shape[0]].copy_(groups.rounded_once())
        self.checkpoint_groups = {}

    def _adopt(self, groups_by_row: dict[int, GroupQuantized]) -> bool:
        """The checkpoint's own codes as this projection's C blocks (exact: the same values as its
        dense weight), where one bit width covers every row and the C kernels read such blocks at
        this dtype. → whether it did."""
        parts = [groups_by_row[row] for row in sorted(groups_by_row)]
        if len({p.bits for p in parts}) != 1:
            return False
        rows = block_quant.block_rows(self.weight, self.prepacked.ops, parts[0].bits)
        if not rows:
            return False
        self.quantized = BlockQuantWeight.from_groups(GroupQuantized.stack_rows(parts))
        self.quantized.blocks = self.quantized.blocks.to(self.weight.device)
        self.quantized.exact = True
        self.quantized_max_rows = rows
        return True

    @property
    def on_checkpoint_blocks(self) -> bool:
        """Whether this projection runs from a checkpoint's own codes (exact blocks)."""
        return isinstance(self.quantized, BlockQuantWeight) and self.quantized.exact

    def quantize(self, bits: int, int4_rows: int) -> None:
        """A `bits`-bit copy: the C kernel's blocks where they serve, for the steps
        block_quant.block_rows says, else torch's int4 layout for steps of at most `int4_rows` rows
        (4 bits only; 8-bit and fp8 copies need the C kernels)."""
        if self.dense_dropped:
            return  # kept only the checkpoint's own codes at load (take_checkpoint_groups)
        if self.weight_in_panels:
            raise ValueError("quantize() needs the dense weight: call it before pack(), which frees it")
        rows = block_quant.block_rows(self.weight, self.prepacked.ops, bits)
        if rows and isinstance(self.quantized, BlockQuantWeight) and self.quantized.bits == bits:
            return  # the checkpoint's own codes already (take_checkpoint_groups): exact
        if rows:
            self.quantized = BlockQuantWeight.quantize(self.weight, bits=bits)  # on the weight's device
            self.quantized_max_rows = rows
        elif bits == 4:
            self.quantized = Int4Weight.quantize(self.weight)
            self.quantized_max_rows = int4_rows
        else:
            what = "fp8 (e4m3)" if bits == block_quant.FP8_BITS else f"{bits}-bit"
            raise ValueError(f"{what} copies need the C kernels and an fp32 or bf16 weight whose shape they "
                             f"take, got a {self.weight.dtype} {tuple(self.weight.shape)} weight with ops "
                             f"{self.prepacked.ops.name!r}")

    @property
    def dense_dropped(self) -> bool:
        return self.weight.numel() == 0 and self.quantized is not None

    @property
    def can_drop_dense(self) -> bool:
        """A projection with blocks whose every step can run from them alone: fp32 on the C kernels
        (the panel GEMM unpacks them for big steps), any dtype on the Triton kernels."""
        return isinstance(self.quantized, BlockQuantWeight) and (
            self.weight.dtype == torch.float32 or self.prepacked.ops.triton)

    def drop_dense(self) -> int:
        """Keeps only the blocks (EngineArgs.quantized_weights_only): frees the dense weight and
        its packed copy; on the C kernels steps of more rows than the block kernel takes then run
        the panel GEMM on panels unpacked from the blocks as it goes (the same weights the block
        kernel computes with). → bytes freed."""
        if not self.can_drop_dense:
            raise ValueError("only an fp32 projection with C blocks (or one with blocks on the Triton kernels) can "
                             "drop its dense weight")
        freed = self.weight.numel() * self.weight.element_size()
        freed += sum(t.numel() * t.element_size() for t in (self.prepacked.packed, self.prepacked.panels)
                     if t is not None)
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device),
                                   requires_grad=False)
        self.prepacked = PackedLinear(self.prepacked.ops)
        return freed

    def _reads_quantized(self, x: torch.Tensor) -> bool:
        """Whether a step of these rows reads the quantised copy."""
        return self.quantized is not None and x.dim() == 2 and x.shape[0] <= self.quantized_max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        return out if self.lora is None else self.lora.apply(x, out)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self._reads_quantized(x):
            out = self.quantized.linear_triton(x) if self.prepacked.ops.triton else self.quantized.linear(x)
            return out if self.bias is None else out + self.bias
        if self.dense_dropped:
            return self._linear_from_blocks(x)
        if self.weight_in_panels:
            return self._linear_from_panels(x)
        return self.prepacked.linear(x, self.weight, self.bias)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the fused gate/up projection: silu(gate) * up without writing the [rows, 2 * inter]
        activation, where the dense panels serve these rows (PackedLinear.silu_and_mul); else None
        (also in a step with adapters, whose products add to gate/up before the activation)."""
        if self._reads_quantized(x) or self.dense_dropped or (self.lora is not None and self.lora.batch.active):
            return None
        return self.prepacked.silu_and_mul(x, self.bias)

    def _linear_from_panels(self, x: torch.Tensor) -> torch.Tensor:
        """The same call, so the same bits, as a step of these rows with the plain weight kept."""
        return self._on_rows(x, lambda rows: cpu_kernels.panel_linear(rows, self.prepacked.panels,
                                                                      self.out_features, self.bias))

    def _linear_from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """fp32, as drop_dense asked: the panel GEMM on panels unpacked from the blocks."""
        return self._on_rows(x, lambda rows: self.quantized.linear_many_rows(rows, self.bias))

    def _on_rows(self, x: torch.Tensor, matmul) -> torch.Tensor:
        """x of any shape as the 2-D rows these kernels take, and the output back in x's shape."""
        rows = x.reshape(-1, x.shape[-1])
        out = matmul(rows) if rows.shape[0] else rows.new_empty(0, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)


class ColumnParallelLinear(Linear):
    """Output features split over the tensor-parallel ranks (QKV, gate/up): each rank keeps rows
    [rank * n / w, (rank + 1) * n / w) of the weight and computes that slice of the outputs."""

    shard_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ops: Ops = TORCH_OPS,
                 parallel: ParallelContext = SINGLE, local_out_features: int | None = None):
        """local_out_features: this rank's outputs where they are not an even share (a QKV whose KV
        heads are replicated over more ranks than there are KV heads)."""
        local = local_out_features or parallel.local_size(out_features, "projection's outputs")
        super().__init__(in_features, local, bias, ops)
        self.parallel = parallel


class RowParallelLinear(Linear):
    """Input features split over the ranks (o_proj, down): each rank keeps those columns of the
    weight; the ranks' partial outputs are summed (one all-reduce per projection)."""

    shard_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ops: Ops = TORCH_OPS,
                 parallel: ParallelContext = SINGLE):
        if bias and not parallel.is_single:
            raise NotImplementedError("a row-parallel projection with a bias over several ranks is not supported")
        super().__init__(parallel.local_size(in_features, "projection's inputs"), out_features, bias, ops)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(super().forward(x))
