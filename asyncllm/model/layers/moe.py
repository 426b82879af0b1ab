"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE): a router, experts, the fused op.

`route` is transformers' router: softmax in fp32 over the router logits, the top k, optionally
renormalised over them. `fused_moe` runs a step's tokens grouped by expert: one stable sort of
the (token, slot) pairs by expert id, one host read of the per-expert counts, then one matmul
pair per expert that has tokens (its rows gathered, never a loop over tokens), each weighted and
added into the output in expert order, as transformers adds them. Each expert is an MLP of our
`Linear`s, so on the CPU its matmuls are the C panel GEMM (packed once at load; the few-rows
kernel for 1-2 rows), and quantisation and weight packing treat experts as any projection.

On CUDA (`Ops.triton`) the experts' weights are stacked once and `asyncllm_kernels.fused_moe`
runs both grouped GEMMs without a host sync (kernels/asyncllm_kernels/moe.py).

Expert parallelism comes with tensor parallelism (tensor_parallel_size > 1): a block holds the
whole experts of its rank's range (`first_expert`, `local_experts`; all of them at world size 1),
the op skips (token, slot) pairs routed elsewhere, and one all-reduce adds the ranks' shares. The
tokens need no all-to-all: after the attention's all-reduce every rank holds every token's
hidden state, and the router is replicated, so each rank routes alike. A shared expert is
tensor-parallel like a dense MLP.
"""
from __future__ import annotations

import torch
from torch import nn

from asyncllm.model.arch_config import LlamaFamilyConfig
from asyncllm.model.interface import ModelContext
from asyncllm.model.layers.linear import Linear
from asyncllm.model.parallel import SINGLE


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (weights [T, k] in the logits' dtype, expert ids [T, k]), as transformers' TopKRouter."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleList,
              first_expert: int = 0) -> torch.Tensor:
    """Σ over each token's routed experts of weight × expert(token), experts of this rank only."""
    out = torch.zeros_like(x)
    flat_ids = ids.flatten() - first_expert
    local = len(experts)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids.clamp(-1, local).add(1), minlength=local + 2).tolist()  # one host sync
    flat_weights = weights.flatten()
    top_k = ids.shape[-1]
    start = counts[0]  # pairs routed to experts below this rank's range sort first
    for expert, count in zip(experts, counts[1:local + 1]):
        if count:
            pairs = order[start:start + count]
            start += count
            rows = pairs // top_k
            y = expert(x.index_select(0, rows)) * flat_weights.index_select(0, pairs).unsqueeze(1)
            out.index_add_(0, rows, y.to(out.dtype))
    return out


class SparseMoeBlock(nn.Module):
    """The MLP of an MoE layer: router (`gate`), experts, and Qwen2-MoE's gated shared expert."""

    def __init__(self, cfg: LlamaFamilyConfig, ctx: ModelContext):
        super().__init__()
        from asyncllm.model.llama import LlamaMLP  # the expert shape: gate/up fused, SiLU, down

        moe = cfg.moe
        self.parallel = ctx.parallel
        self.top_k, self.normalize = moe.top_k, moe.normalize_top_k
        self.gate = Linear(cfg.hidden_size, moe.num_experts, False, ctx.ops)  # replicated: every rank routes
        # Expert parallel: this rank's range of whole experts (not split by tensor parallelism).
        self.local_experts = ctx.parallel.local_size(moe.num_experts, "number of experts")
        self.first_expert = ctx.parallel.rank * self.local_experts
        whole = ModelContext(ctx.ops, SINGLE)
        self.experts = nn.ModuleList(LlamaMLP(cfg, whole, moe.intermediate_size) for _ in range(self.local_experts))
        shared = moe.shared_expert_intermediate_size
        self.shared_expert = LlamaMLP(cfg, ctx, shared) if shared else None  # tensor-parallel, as a dense MLP
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, False, ctx.ops) if shared else None
        self.triton = ctx.ops.triton and ctx.parallel.world_size == 1
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' gate|up and down weights as [experts, 2 * inter, hidden] and [experts, hidden,
        inter] (the Triton kernel's layout), made once; each expert's weights become views of them,
        so the stack costs no second copy."""
        if self._stacked is None:
            w13 = torch.stack([e.gate_up_proj.weight.detach() for e in self.experts])
            w2 = torch.stack([e.down_proj.weight.detach() for e in self.experts])
            for i, expert in enumerate(self.experts):
                expert.gate_up_proj.weight.data = w13[i]
                expert.down_proj.weight.data = w2[i]
            self._stacked = (w13, w2)
        return self._stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.normalize)
        if self.triton:
            from asyncllm_kernels import fused_moe as triton_fused_moe

            out = triton_fused_moe(x, *self.stacked_weights(), weights, ids)
        else:
            out = fused_moe(x, weights, ids, self.experts, self.first_expert)
            out = self.parallel.all_reduce(out)  # every rank's experts' share (each token's rows are on all ranks)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
