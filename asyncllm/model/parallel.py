"""ParallelContext: a rank's place in a tensor-parallel group, as the layers that split see it.

Column-parallel projections (QKV, gate/up) keep rows [rank * n / w, (rank + 1) * n / w) of
their weight; row-parallel ones (o_proj, down) keep those columns and all-reduce their output;
the vocabulary embedding and the logits split the vocabulary. At world size 1 every shard is
the whole tensor and no collective runs; above it the ranks are worker processes of one
torch.distributed group (asyncllm/executor/multiproc.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    # Shared-memory collectives between the ranks of one host (shm_collectives.py), used for the
    # tensors they take; torch.distributed for the rest, in `group` (None: all ranks; with pipeline
    # stages, this stage's ranks).
    shm: Any = field(default=None, compare=False, repr=False)
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size}")

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def local_size(self, size: int, what: str = "dimension") -> int:
        if size % self.world_size:
            raise ValueError(f"a {what} of {size} does not split over {self.world_size} ranks")
        return size // self.world_size

    def local_kv_heads(self, kv_heads: int) -> int:
        """KV heads a rank keeps: its share, or one replicated KV head where there are fewer KV
        heads than ranks (each serving the query heads of its rank; vLLM's rule)."""
        if kv_heads >= self.world_size or self.world_size % kv_heads:
            return self.local_size(kv_heads, "number of KV heads")
        return 1

    def shard_kv_heads(self, tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """This rank's K or V projection rows (a K/V part of a checkpoint's QKV, heads along dim 0)."""
        local = self.local_kv_heads(kv_heads)
        if local * self.world_size == kv_heads:
            return self.shard(tensor, 0)
        rows = tensor.shape[0] // kv_heads
        head = self.rank * kv_heads // self.world_size  # the KV head this rank's query heads read
        return tensor.narrow(0, head * rows, rows)

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor along `dim`."""
        if self.is_single:
            return tensor
        size = self.local_size(tensor.shape[dim])
        return tensor.narrow(dim, self.rank * size, size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' partial outputs (row-parallel projections)."""
        if self.is_single:
            return x
        if self.shm is not None and self.shm.takes(x):
            return self.shm.all_reduce(x)
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' column slices side by side (vocabulary-parallel logits)."""
        if self.is_single:
            return x
        if self.shm is not None and self.shm.takes(x):
            return self.shm.all_gather_last(x)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()


def check_tensor_parallel(config, world_size: int) -> None:
    """Refuses, before any worker starts, a model that does not split over `world_size` ranks."""
    if world_size == 1:
        return
    if getattr(config, "is_encoder_only", False):
        raise ValueError(f"tensor_parallel_size > 1 is not supported for encoder models yet ({config.architecture})")
    group = ParallelContext(0, world_size)
    moe = getattr(config, "moe", None)
    sizes = [(config.num_heads, "number of heads"), (config.intermediate_size, "intermediate size"),
             (config.vocab_size, "vocabulary")]
    if moe is not None:  # whole experts per rank; a shared expert split as a dense MLP
        sizes.append((moe.num_experts, "number of experts"))
        if moe.shared_expert_intermediate_size:
            sizes.append((moe.shared_expert_intermediate_size, "shared expert's intermediate size"))
    try:
        for size, what in sizes:
            group.local_size(size, what)
        group.local_kv_heads(config.num_kv_heads)
    except ValueError as exc:
        raise ValueError(f"{config.architecture} cannot run with tensor_parallel_size={world_size}: {exc}") from None


@dataclass(frozen=True)
class PipelineContext:
    """A rank's stage of a pipeline-parallel group: layers [first_layer, end_layer) of the model;
    the first stage embeds, the last one normalises, computes logits and samples. Between stages
    the step's hidden states and residual cross point to point (torch.distributed send / recv); the
    stages before the last learn the sampled tokens from their next step (the scheduler sends them).
    At one stage it is the whole model and nothing is sent."""

    stage: int = 0
    num_stages: int = 1
    first_layer: int = 0
    end_layer: int = 0
    rank: int = 0  # this process's rank among all; the next stage's peer is rank + stride
    stride: int = 1  # the tensor-parallel size: ranks are stage-major

    @staticmethod
    def of(stage: int, num_stages: int, num_layers: int, rank: int | None = None,
           stride: int = 1) -> "PipelineContext":
        """Stage `stage`'s even share of `num_layers` (earlier stages take one fewer when uneven)."""
        if num_layers < num_stages:
            raise ValueError(f"{num_layers} layers cannot split over {num_stages} pipeline stages")
        return PipelineContext(stage, num_stages, stage * num_layers // num_stages,
                               (stage + 1) * num_layers // num_stages, stage if rank is None else rank, stride)

    @property
    def is_single(self) -> bool:
        return self.num_stages == 1

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def owns(self, layer: int) -> bool:
        return self.is_single or self.first_layer <= layer < self.end_layer

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """To the next stage: the hidden states and residual of every token of the step."""
        torch.distributed.send(torch.stack((hidden, residual)).contiguous(), self.rank + self.stride)

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
        torch.distributed.recv(both, self.rank - self.stride)
        return both[0], both[1]


SINGLE_STAGE = PipelineContext()


def check_pipeline_parallel(config, args) -> None:
    """Refuses, before any worker starts, what pipeline parallelism does not run."""
    stages = args.pipeline_parallel_size
    if stages == 1:
        return
    if getattr(config, "is_encoder_only", False) or not hasattr(config, "num_layers"):
        raise ValueError(f"pipeline_parallel_size > 1 is not supported for {config.architecture}")
    PipelineContext.of(0, stages, config.num_layers)
