"""LoRAManager: a worker's adapters, and each step's row → adapter mapping.

Adapters are loaded on first use from their folder (a request carries its LoRARequest) into
a host cache of `max_cpu_loras` (LRU), and the ones a step uses are made resident on the
device: at most `max_loras`, least recently used evicted (the scheduler never runs more
distinct adapters at once, so a step's set always fits). On the CPU the resident copy is the
cached one. Before each forward, `prepare_step` hands the model's LoRABatch the step's
adapters and the per-row mask.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.lora.adapter import AdapterWeights, load_adapter
from asyncllm.lora.layers import LoRABatch, LoRAProjection
from asyncllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


def _kernels(ops, device: torch.device) -> str:
    """Which kernels a projection's LoRA products take for steps of few rows (layers.LoRAProjection)."""
    if ops.c_kernels and device.type == "cpu" and cpu_kernels.build_error() is None:
        return "cpu"
    return "triton" if ops.triton else "torch"


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 device: torch.device, dtype: torch.dtype):
        if not hasattr(model, "lora_parts"):
            raise ValueError(f"{type(model).__name__} does not take LoRA adapters")
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.device = device
        self.dtype = dtype
        self.batch = LoRABatch()
        for name, parts in model.lora_parts().items():
            module = model.get_submodule(name)
            module.lora = LoRAProjection([m for m, _, _ in parts], [(s, e) for _, s, e in parts],
                                         module.in_features, self.batch, _kernels(module.prepacked.ops, device))
        model.lora_batch = self.batch
        self._host: OrderedDict[tuple[int, str], AdapterWeights] = OrderedDict()  # by LoRARequest.key
        self._resident: OrderedDict[tuple[int, str], AdapterWeights] = OrderedDict()
        self.load_seconds: list[float] = []  # each load from disk (benchmarks read it)

    def _host_copy(self, lora: LoRARequest) -> AdapterWeights:
        weights = self._host.get(lora.key)
        if weights is None:
            started = time.perf_counter()
            weights = load_adapter(lora.lora_path, lora.lora_int_id, self.model.config, self.max_lora_rank,
                                   self.dtype)
            self.load_seconds.append(time.perf_counter() - started)
            logger.info("LoRA %r (id %d, rank %d) loaded from %s in %.1f ms", lora.lora_name, lora.lora_int_id,
                        weights.rank, lora.lora_path, self.load_seconds[-1] * 1e3)
            self._host[lora.key] = weights
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        self._host.move_to_end(lora.key)
        return weights

    def _make_resident(self, lora: LoRARequest, step_keys: set[tuple[int, str]]) -> AdapterWeights:
        weights = self._resident.get(lora.key)
        if weights is None:
            if len(self._resident) >= self.max_loras:
                victim = next((key for key in self._resident if key not in step_keys), None)
                if victim is None:
                    raise RuntimeError(f"a step uses more than max_loras={self.max_loras} adapters")
                del self._resident[victim]
            weights = self._host_copy(lora).to(self.device)
            self._resident[lora.key] = weights
        self._resident.move_to_end(lora.key)
        return weights

    def prepare_step(self, loras: Sequence[LoRARequest | None], query_start: Sequence[int]) -> None:
        """`loras[i]`: request i's adapter (None: the base model), its rows
        [query_start[i], query_start[i + 1]) of the step's flat batch."""
        order: dict[tuple[int, str], LoRARequest] = {}
        for lora in loras:
            if lora is not None:
                order.setdefault(lora.key, lora)
        if not order:
            self.batch.clear()
            return
        keys = set(order)
        adapters = [self._make_resident(lora, keys) for lora in order.values()]
        column = {key: j for j, key in enumerate(order)}
        per_request = [column[lora.key] if lora is not None else -1 for lora in loras]
        lengths = torch.tensor([query_start[i + 1] - query_start[i] for i in range(len(loras))])
        row_adapter = torch.repeat_interleave(torch.tensor(per_request, dtype=torch.int64), lengths)
        mask = None
        if len(adapters) > 1 or -1 in per_request:
            rank = max(a.rank for a in adapters)
            one_hot = row_adapter[:, None] == torch.arange(len(adapters))[None, :]
            mask = one_hot.repeat_interleave(rank, dim=1).to(device=self.device, dtype=self.dtype)
        self.batch.set(adapters, mask, row_adapter.to(self.device))
