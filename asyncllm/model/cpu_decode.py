"""Decode steps through one C call for the whole decoder (kernels="cpu", fp32 or bf16): of any
number of sequences where every projection is read from its panel copy, of 1-8 where some are
read from blocks or from a dense fp32 weight without one (the few-rows matmul).

Such a step is bound by reading every weight from memory (~540 MB in fp32 for the default
model), and the per-op forward spent ~20% of a batch-1 step between the matmuls: Python calls,
tensor views and an OpenMP fork/join for each of ~10 small ops per layer. `decode_stack`
(kernels/cpu/decode_stack_impl.h) runs the same ops in the same order in one parallel
region (it reads the projections' fp32 or bf16 panel copies, as the per-op path does). At W1's
64-row decode steps it saves the per-op path's ~300 Python-level calls per step too (a bf16
step 33 -> 26 ms). Prompt steps and other dtypes keep the per-op forward. With
`quantization` the projections that have 4- or 8-bit blocks (layers/block_quant.py) are read from
them here too, by the same C kernel the per-op path calls.

Its results equal the per-op C path's bit for bit (the same row functions and matmul tiles, at
one row as at eight; tested against transformers like every path).
"""
from __future__ import annotations

import torch
from torch import nn

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.attention import AttentionMetadata
from asyncllm.model.layers.block_quant import BlockQuantWeight
from asyncllm.kernels.cpu.decode_stack import DecodeShape, DecodeStackArgs

MAX_ROWS = cpu_kernels.FEW_ROWS_MAX  # the block and few-rows kernels' limit: projections without a panel copy


def _reads_panels(p) -> bool:
    """Read from its panel copy at every row count, by the stack and the per-op path alike."""
    return p.quantized is None and p.prepacked.panels is not None


def _projection_fits(p) -> bool:
    """fp32, and either blocks for every step the stack takes, its panel copy, or a dense weight
    whose shape the few-rows matmul takes (torch's int4 layout: none of these); or bf16 with its
    panel copy (what the per-op path reads at every row count, so both give the same bits)."""
    if _reads_panels(p):
        return p.weight.dtype in (torch.float32, torch.bfloat16)
    if p.weight.dtype != torch.float32:
        return False
    if p.quantized is None:
        return cpu_kernels.few_rows_weight_supported(p.weight)
    return isinstance(p.quantized, BlockQuantWeight) and p.quantized_max_rows >= MAX_ROWS


def _block_bits(model: nn.Module) -> set[int]:
    """The widths of the projections' C blocks (the C structure has room for one)."""
    return {p.quantized.bits for p in model.projections() if isinstance(p.quantized, BlockQuantWeight)}


def _panels_only(model: nn.Module) -> bool:
    """Every projection read from its panel copy at every row count: the stack takes steps of any size."""
    return all(_reads_panels(p) for p in model.projections())


def _weights_fit(model: nn.Module) -> bool:
    return (model.config.head_dim % 2 == 0 and len(_block_bits(model)) <= 1
            and all(_projection_fits(p) for p in model.projections()))


def _blocks(p) -> torch.Tensor | None:
    return None if p.quantized is None else p.quantized.blocks


def _panels(p) -> torch.Tensor | None:
    return p.prepacked.panels


class CpuDecodeStack:
    """The C structure for one model and KV cache, built on the first decode step it takes (after
    load-time changes such as 4-bit copies), rebuilt if the engine hands over other caches."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.enabled = _weights_fit(model)
        self.max_rows = None if _panels_only(model) else MAX_ROWS  # None: any number of rows
        self._args: DecodeStackArgs | None = None
        self._lora_version = -1  # the LoRABatch version the structure's adapter pointers are of
        self.lora_steps = 0  # steps run with adapters (tests check the C path ran)

    def takes(self, num_tokens: int, meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> bool:
        return (self.enabled and (self.max_rows is None or num_tokens <= self.max_rows)
                and meta.num_decodes == meta.num_requests == num_tokens
                and kv_caches[0].dtype == self.model.norm.weight.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """→ final hidden states [T, hidden], as the model's forward returns them."""
        args = self._args
        if args is None or args.kv_caches is not kv_caches:
            args = self._args = self._build(kv_caches)
            self._lora_version = -1
        self._set_lora(args)
        return args.run(self.model.embed_tokens(input_ids), positions, meta.slot_mapping, meta.block_tables,
                        meta.seq_lens_tensor)

    def _set_lora(self, args: DecodeStackArgs) -> None:
        """Points the structure at the step's adapters (LoRA products in the same call)."""
        batch = getattr(self.model, "lora_batch", None)
        if batch is None or not batch.active:
            args.set_lora_rows(None)
            return
        if self._lora_version != batch.version:
            layers = []
            for layer in self.model.layers:
                projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                               layer.mlp.down_proj)
                layers.append([p.lora.c_layout(args.dtype) for p in projections])
            args.set_lora(layers, batch.rank)
            self._lora_version = batch.version
        args.set_lora_rows(batch.row_adapter)
        self.lora_steps += 1

    def _build(self, kv_caches: list[torch.Tensor]) -> DecodeStackArgs:
        model, cfg = self.model, self.model.config
        attention0 = model.layers[0].self_attn
        shape = DecodeShape(hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                            head_dim=cfg.head_dim, intermediate=cfg.intermediate_size, eps=cfg.rms_norm_eps,
                            scale=attention0.backend.scale, window=cfg.sliding_window or 0,
                            quant_bits=max(_block_bits(model), default=0))
        layers = []
        for layer in model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            layers.append({
                "input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
                "qkv": attention.qkv_proj.weight, "qkv_bias": attention.qkv_proj.bias,
                "q_norm": None if attention.q_norm is None else attention.q_norm.weight,
                "k_norm": None if attention.k_norm is None else attention.k_norm.weight,
                "o": attention.o_proj.weight, "gate_up": mlp.gate_up_proj.weight, "gate_up_bias": mlp.gate_up_proj.bias,
                "down": mlp.down_proj.weight, "down_bias": mlp.down_proj.bias,
                "qkv_quant": _blocks(attention.qkv_proj), "o_quant": _blocks(attention.o_proj),
                "gate_up_quant": _blocks(mlp.gate_up_proj), "down_quant": _blocks(mlp.down_proj),
                "qkv_panels": _panels(attention.qkv_proj), "o_panels": _panels(attention.o_proj),
                "gate_up_panels": _panels(mlp.gate_up_proj), "down_panels": _panels(mlp.down_proj),
            })
        return DecodeStackArgs(shape, layers, model.norm.weight, model.rotary.cos, model.rotary.sin, kv_caches)
