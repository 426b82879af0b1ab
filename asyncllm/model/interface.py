"""The model interface: what every model class implements, and what it is built with.

The worker builds a model from its HF config and a `ModelContext` (the op choice and the
parallel context), fills it from an iterator of (transformers name, tensor) pairs, then calls
`forward` over each step's flattened varlen batch and `compute_logits` on the rows that
sample. Embedding models add a `pooler`; decoders leave it None.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from asyncllm.model.layers.ops import TORCH_OPS, Ops
from asyncllm.model.parallel import SINGLE, SINGLE_STAGE, ParallelContext, PipelineContext


@dataclass(frozen=True)
class ModelContext:
    ops: Ops = TORCH_OPS
    parallel: ParallelContext = field(default=SINGLE)
    pipeline: PipelineContext = field(default=SINGLE_STAGE)
    # Projections that come as exact groups (a GGUF's blocks under quantization, a GPTQ / AWQ /
    # compressed-tensors / FP8 checkpoint) keep only their blocks from the load on, where the
    # blocks serve every step: their dense weight is never written, so the load's peak memory is
    # about the blocks', not the dense model's (the worker sets it where the dense copy would be
    # dropped anyway: quantized_weights_only, a quantised checkpoint).
    blocks_only: bool = False


# Decoder projections' module names as checkpoints spell them (and Phi-3's fused ones).
_DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                        "gate_up_proj")


def is_decoder_projection(weight_name: str) -> bool:
    """Whether a checkpoint tensor is a decoder layer's attention or MLP projection, which can run
    from quantised blocks: not an MoE expert's (stacked), not a vision tower's, not the embedding."""
    parts = weight_name.split(".")
    return (len(parts) >= 2 and parts[-2] in _DECODER_PROJECTIONS and "experts" not in parts
            and not any("vision" in part for part in parts))


def copy_checked(params: dict[str, torch.nn.Parameter], target: str, tensor: torch.Tensor, name: str,
                 model: str) -> None:
    """A checkpoint tensor `name` into parameter `target`, refused with why when it has no place or
    another shape."""
    if target not in params:
        raise ValueError(f"checkpoint tensor {name!r} has no place in {model}")
    if params[target].shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(params[target].shape)}")
    params[target].copy_(tensor)


@runtime_checkable
class CausalLM(Protocol):
    config: Any
    pooler: Any  # None for decoders; embedding models pool hidden states into one vector per sequence

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: Any) -> torch.Tensor:
        """[T] token ids and positions of every request in the step, flattened → hidden states [T, hidden]."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the sampling rows → fp32 logits [rows, vocab]."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies transformers-named tensors in (each rank keeps its shard); raises on a missing one."""
