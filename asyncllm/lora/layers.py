"""The LoRA products of a mixed-adapter batch, all rows at once (Punica's idea, as matmuls).

Each projection adds `x @ A_j^T @ B_j^T * s_j` to the rows of adapter j. Per step the
adapters the batch uses ("active", at most max_loras) are laid side by side:

    A_act: [in, P * n * r]    part p of the projection (q, k, v of a fused QKV), adapter j:
                              columns p*n*r + j*r ... + r (ranks zero-padded to the step's largest)
    B_act[p]: [n * r, out_p]  B_j^T * s_j in rows j*r ... + r

so the shrink is one matmul for all rows and parts, a mask zeroes the columns of the
adapters a row does not use (rows of the base model: all of them), and the expand is one
matmul per part (one per projection for o/down), added into that part's output columns.
No Python loop over adapters or rows; what a row does not use costs n*r extra columns in
the shrink and expand (r << in, out). A step whose rows all use one adapter skips the mask.
The side-by-side tensors depend only on the active adapters, so they are rebuilt when that
set changes (a LoRABatch version), not every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.lora.adapter import AdapterWeights

TRITON_MAX_ROWS = 64  # decode batches; prompt steps' matmuls suit the torch path better


@dataclass
class LoRABatch:
    """The step's adapters and row mask, shared by every LoRA projection of one model (set by
    the worker's LoRAManager before each forward)."""

    adapters: list[AdapterWeights] = field(default_factory=list)  # the active ones, in column order
    rank: int = 0  # the padded rank: the largest of theirs
    mask: torch.Tensor | None = None  # [T, n * rank]: 1 where a row uses that adapter; None: all use adapters[0]
    row_adapter: torch.Tensor | None = None  # [T] int64: each row's adapter (-1: none), for the kernels
    version: int = 0  # bumped whenever adapters / rank change

    @property
    def active(self) -> bool:
        return bool(self.adapters)

    def set(self, adapters: list[AdapterWeights], mask: torch.Tensor | None,
            row_adapter: torch.Tensor | None = None) -> None:
        if len(adapters) != len(self.adapters) or any(a is not b for a, b in zip(adapters, self.adapters)):
            self.adapters, self.rank = adapters, max((a.rank for a in adapters), default=0)
            self.version += 1
        self.mask, self.row_adapter = mask, row_adapter

    def clear(self) -> None:
        self.set([], None)


class LoRAProjection:
    """The LoRA side of one projection (a Linear): its parts' PEFT module names and output
    columns, and the side-by-side adapter tensors of the current active set."""

    def __init__(self, modules: list[str], slices: list[tuple[int, int]], in_features: int,
                 batch: LoRABatch, kernels: str = "torch"):
        self.modules = modules  # PEFT name of each part, e.g. "layers.0.self_attn.q_proj"
        self.slices = slices  # each part's output columns [start, end)
        self.in_features = in_features
        self.batch = batch
        # "cpu": steps of 1-8 rows through the C kernel (kernels/cpu lora_rows); "triton": steps of
        # up to TRITON_MAX_ROWS rows through asyncllm_kernels.lora_bgmv. At a decode step's few rows
        # the torch path's ~5 small ops per projection cost more than the products themselves.
        self.kernels = kernels
        self._bgmv = None
        if kernels == "triton":  # bound once: apply runs for every projection of every step
            from asyncllm_kernels import lora_bgmv

            self._bgmv = lora_bgmv
        self._ends = tuple(end for _, end in slices)
        self._part_ends = torch.tensor(self._ends, dtype=torch.int64)
        self._version = -1
        self._a: torch.Tensor | None = None  # A_act, None when no active adapter targets this projection
        self._b: list[torch.Tensor] = []
        self._c_version = -1
        self._c_of: tuple[torch.dtype, torch.device] | None = None  # what _c was built as
        self._c: tuple[torch.Tensor, torch.Tensor] | None = None
        self._c_call: cpu_kernels.LoRARows | None = None  # lora_rows bound to _c
        self._c_call_of: tuple | None = None  # the layout it is bound to

    def _targeted(self) -> bool:
        return any(m in a.tensors for a in self.batch.adapters for m in self.modules)

    def c_layout(self, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
        """The active adapters as the kernels read them (decode_stack_impl.h lora_for, lora_rows,
        asyncllm_kernels.lora_bgmv), in `dtype` (the activations') on `device`: a [n, P * r, in]
        (part p's A in rows p*r ...), b [n, r, out] (B^T * scaling, each part's columns); None
        when none of them targets this projection."""
        batch = self.batch
        if self._c_version != batch.version or self._c_of != (dtype, torch.device(device)):
            self._c_version, self._c_of = batch.version, (dtype, torch.device(device))
            self._c = None
            if self._targeted():
                n, r, parts = len(batch.adapters), batch.rank, len(self.modules)
                out = self.slices[-1][1]
                a_c = torch.zeros(n, parts * r, self.in_features, dtype=dtype, device=device)
                b_c = torch.zeros(n, r, out, dtype=dtype, device=device)
                for p, (module, (start, end)) in enumerate(zip(self.modules, self.slices)):
                    for j, adapter in enumerate(batch.adapters):
                        pair = adapter.tensors.get(module)
                        if pair is not None:
                            a, b = pair
                            a_c[j, p * r:p * r + a.shape[0]] = a
                            b_c[j, :b.shape[1], start:end] = b.t()
                self._c = (a_c, b_c)
        return self._c

    def _rows_kernel(self, dtype: torch.dtype) -> cpu_kernels.LoRARows | None:
        layout = self.c_layout(dtype)
        if layout is None:
            return None
        if self._c_call_of is not layout:
            self._c_call, self._c_call_of = cpu_kernels.LoRARows(*layout, self._part_ends), layout
        return self._c_call

    def _rebuild(self, like: torch.Tensor) -> None:
        batch, parts = self.batch, len(self.modules)
        n, r = len(batch.adapters), batch.rank
        width = n * r
        self._version = batch.version
        if not self._targeted():
            self._a, self._b = None, []
            return
        a_act = torch.zeros(self.in_features, parts * width, dtype=like.dtype, device=like.device)
        b_act = [torch.zeros(width, end - start, dtype=like.dtype, device=like.device) for start, end in self.slices]
        for p, module in enumerate(self.modules):
            for j, adapter in enumerate(batch.adapters):
                pair = adapter.tensors.get(module)
                if pair is None:
                    continue
                a, b = pair
                column = p * width + j * r
                a_act[:, column:column + a.shape[0]] = a.t()
                b_act[p][j * r:j * r + b.shape[1]] = b.t()
        self._a, self._b = a_act, b_act

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base projection of x) plus each row's adapter product, in place."""
        batch = self.batch
        if not batch.active:
            return out
        rows = x.reshape(-1, self.in_features)
        flat = out.view(-1, out.shape[-1])
        if self.kernels != "torch" and batch.row_adapter is not None and rows.stride(1) == 1 and flat.stride(1) == 1:
            if self.kernels == "cpu" and rows.shape[0] <= cpu_kernels.FEW_ROWS_MAX and cpu_kernels.supports(rows):
                call = self._rows_kernel(rows.dtype)
                if call is not None:
                    call(rows, flat, batch.row_adapter)
                return out
            if self._bgmv is not None and rows.shape[0] <= TRITON_MAX_ROWS:
                layout = self.c_layout(rows.dtype, rows.device)
                if layout is not None:
                    self._bgmv(rows, flat, batch.row_adapter, layout[0], layout[1], self._ends)
                return out
        if self._version != batch.version:
            self._rebuild(x)
        if self._a is None:
            return out
        shrunk = rows @ self._a  # [T, P * n * r]
        width = self._b[0].shape[0]
        if batch.mask is not None:
            shrunk.view(rows.shape[0], len(self.modules), width).mul_(batch.mask.unsqueeze(1))
        for p, (start, end) in enumerate(self.slices):
            flat[:, start:end].addmm_(shrunk[:, p * width:(p + 1) * width], self._b[p])
        return out
