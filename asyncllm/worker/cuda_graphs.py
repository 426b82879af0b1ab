"""CUDA graphs of decode steps (vLLM's piecewise-free "full" cudagraph for pure-decode batches).

A decode step of a small model on a GPU is bound by launching its ~10 kernels per layer from
Python, not by the GPU: one graph replay launches them all. A graph holds fixed shapes and
addresses, so the step's inputs are copied into static buffers and the batch is padded up to the
nearest captured size (`cuda_graph_sizes`, vLLM's default 1, 2, 4 and multiples of 8). Padding
rows write no K/V (slot -1: the KV-write kernel skips it) and attend to one key of a block they
only read (seq_len 1), and their hidden rows are dropped, so a request's result is the eager
step's.

Only steps the graph can replay take it: every request decoding exactly one token, on the Triton
kernels (the torch attention backend builds masks from host-side lengths), with no LoRA
adapters, draft model, images, MoE (its expert counts go through the host), pipeline stages or
tensor-parallel ranks; any other step runs eagerly as before. `enforce_eager` turns graphs off.

Without CUDA (`capture=False`, the tests on Triton's interpreter) the same padded static buffers
run the model eagerly, which checks everything here but the capture itself.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from asyncllm.model.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_DEFAULT_SIZE = 512  # vLLM's largest default capture size


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's default buckets: 1, 2, 4, then every multiple of 8, up to max_num_seqs (rounded up to a
    bucket, so a full batch has one)."""
    top = min(max_num_seqs, MAX_DEFAULT_SIZE)
    sizes = [s for s in (1, 2, 4) if s < top] + list(range(8, top, 8))
    return sorted(set(sizes + [top if top <= 4 else -(-top // 8) * 8]))


def graph_unsupported_reason(model: torch.nn.Module, kernels: str, *, lora: bool, draft: bool) -> str | None:
    """Why this model's decode steps cannot run from graphs (None: they can)."""
    ctx = getattr(model, "ctx", None)
    if kernels != "triton":
        return f"kernels={kernels!r} (graphs replay the Triton kernels' steps)"
    if lora:
        return "LoRA adapters (the step's adapter mapping is host-side)"
    if draft:
        return "a draft model"
    if getattr(model, "vision_tower", None) is not None:
        return "an image model"
    if getattr(getattr(model, "config", None), "moe", None) is not None:
        return "mixture of experts (its expert counts are read on the host)"
    if ctx is not None and (not ctx.pipeline.is_single or not ctx.parallel.is_single):
        return "tensor or pipeline parallel ranks"
    return None


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph | None"  # None: eager replay (no CUDA)
    hidden: torch.Tensor | None  # the captured output [size, hidden]


class DecodeGraphs:
    """Static input buffers, one graph per capture size, and the replay of a decode step."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int], max_blocks: int,
                 device: torch.device, capture: bool):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"cuda_graph_sizes must be positive batch sizes, got {sizes!r}")
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = sorted(set(sizes))
        top = self.sizes[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(top, max_blocks, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=device)
        self.graphs: dict[int, _Graph] = {}
        self.replays = 0  # steps that ran from these buffers (a test's and the logs' count)
        if capture:
            self._capture_all()
        else:
            self.graphs = {size: _Graph(None, None) for size in self.sizes}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(num_decodes=size, query_start_loc=list(range(size + 1)), seq_lens=[1] * size,
                                 seq_lens_tensor=self.seq_lens[:size], block_tables=self.block_tables[:size],
                                 slot_mapping=self.slot_mapping[:size])

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._meta(size))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest first, all in one memory pool (a smaller graph's activations fit in the larger's).
        The buffers hold padding (slot -1, seq_len 1) while capturing, so the warm-up writes nothing."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton compiles and cuBLAS picks its kernels outside the capture
                self._forward(self.max_size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            self.graphs[size] = _Graph(graph, hidden)
        torch.cuda.synchronize(self.device)
        logger.info("CUDA graphs: captured %d decode sizes (%s) in %.1fs", len(self.sizes),
                    ", ".join(map(str, self.sizes)), time.perf_counter() - started)

    def bucket(self, rows: int) -> int | None:
        """The smallest capture size that holds `rows` decodes (None: more than the largest)."""
        for size in self.sizes:
            if size >= rows:
                return size
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """One decode row per request (rows <= max_size) → their hidden states [rows, hidden]."""
        rows = input_ids.shape[0]
        size = self.bucket(rows)
        if size is None:
            raise ValueError(f"{rows} decodes exceed the largest graph ({self.max_size})")
        if block_tables.shape[1] > self.block_tables.shape[1]:
            raise ValueError(f"block tables of {block_tables.shape[1]} blocks exceed the graphs' "
                             f"{self.block_tables.shape[1]}")
        self.input_ids[:rows].copy_(input_ids, non_blocking=True)
        self.positions[:rows].copy_(positions, non_blocking=True)
        self.seq_lens[:rows].copy_(seq_lens, non_blocking=True)
        self.block_tables[:rows, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.slot_mapping[:rows].copy_(slot_mapping, non_blocking=True)
        # Padding rows: no K/V write, one key read from whatever block their stale table row names.
        self.slot_mapping[rows:size].fill_(-1)
        self.seq_lens[rows:size].fill_(1)
        self.replays += 1
        entry = self.graphs[size]
        if entry.graph is None:
            return self._forward(size)[:rows]
        entry.graph.replay()
        return entry.hidden[:rows]
