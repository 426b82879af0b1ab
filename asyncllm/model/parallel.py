"""ParallelContext: a rank's place in a tensor-parallel group, as the layers that split see it.

Column-parallel projections (QKV, gate/up) keep rows [rank * n / w, (rank + 1) * n / w) of
their weight; row-parallel ones (o_proj, down) keep those columns and all-reduce their output;
the vocabulary embedding and the logits split the vocabulary. At world size 1 (all there is
today) every shard is the whole tensor and no collective runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

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

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor along `dim`."""
        if self.is_single:
            return tensor
        size = self.local_size(tensor.shape[dim])
        return tensor.narrow(dim, self.rank * size, size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' partial outputs (row-parallel projections)."""
        if not self.is_single:
            torch.distributed.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' column slices side by side (vocabulary-parallel logits)."""
        if self.is_single:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()
