"""ModelRunner: owns the model and the paged KV cache; turns a SchedulerOutput into tokens.

It flattens the scheduled requests into one varlen batch (ids, positions, slot mapping,
block tables), runs one forward, computes logits only at the rows that sample (and at
prompt positions of requests that asked for prompt logprobs), and samples.
"""
from __future__ import annotations

import logging
import math
import mmap
import time
from dataclasses import dataclass

import torch

from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.model.arch_config import LlamaFamilyConfig
from asyncllm.model.layers.attention import AttentionMetadata
from asyncllm.outputs import TokenLogprobs
from asyncllm.sampling.logits_processors import SamplingBatch
from asyncllm.sampling.sampler import Sampler, prompt_logprobs_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


# Linux >= 5.14 (the same value on every architecture); older kernels refuse it with EINVAL.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, prefault: bool = False) -> torch.Tensor:
    """A zeroed tensor; on the CPU backed by anonymous mmap, whose pages the kernel zero-fills
    on first touch, so a 1 GiB cache costs nothing at start-up (torch.zeros writes every page).
    Zeros matter: attention masks padded slots, but 0 * NaN from stale memory would still be NaN.
    `prefault` maps every page now: a first touch costs ~2-9 us per 4 KiB page on a VM, paid at
    start instead of inside the first requests' steps (measured: ~70 ms of a 0.85 s prompt step)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    size = max(1, numel * torch.empty((), dtype=dtype).element_size())
    buffer = mmap.mmap(-1, size)
    if prefault:
        try:
            buffer.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: write one byte of each page instead
            page_bytes = torch.frombuffer(buffer, dtype=torch.uint8, count=size)
            page_bytes[::mmap.PAGESIZE].zero_()
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: LlamaFamilyConfig, spec: KVCacheSpec, num_blocks: int,
                 device: torch.device, seed: int, prefault: bool = False):
        self.model = model
        self.config = config
        self.spec = spec
        self.device = device
        self.num_blocks = num_blocks
        started = time.perf_counter()
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [_zeros(shape, spec.dtype, device, prefault) for _ in range(spec.num_layers)]
        logger.info("KV cache: %d blocks x %d tokens (%.0f MiB%s) in %.2fs", num_blocks, spec.block_size,
                    num_blocks * spec.bytes_per_block / 2**20, ", prefaulted" if prefault else "",
                    time.perf_counter() - started)
        self.sampler = Sampler(seed, device)

    def release(self) -> None:
        self.kv_caches = []

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.spec.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        num_decodes = 0
        for item in sched.scheduled:
            start, end = item.start, item.start + item.num_new_tokens
            input_ids.extend(item.request.token_ids(start, end))
            blocks = item.block_ids
            for pos in range(start, end):
                positions.append(pos)
                slots.append(blocks[pos // bs] * bs + pos % bs)
            query_start.append(len(input_ids))
            seq_lens.append(end)
            if item.num_new_tokens == 1 and num_decodes == len(seq_lens) - 1:
                num_decodes += 1

        max_blocks = max(len(item.block_ids) for item in sched.scheduled)
        table = torch.zeros(len(sched.scheduled), max_blocks, dtype=torch.long)
        for i, item in enumerate(sched.scheduled):
            table[i, :len(item.block_ids)] = torch.tensor(item.block_ids, dtype=torch.long)
        dev = self.device
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=query_start,
            seq_lens=seq_lens,
            seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            block_tables=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
        )
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches, meta)

        result = ModelRunnerOutput(sampled={})
        self._prompt_logprobs(sched, hidden, query_start, result)
        sample_items = [(i, item) for i, item in enumerate(sched.scheduled) if item.samples]
        if not sample_items:
            return result
        rows = torch.tensor([query_start[i + 1] - 1 for i, _ in sample_items], device=dev)
        logits = self.model.compute_logits(hidden[rows])
        batch = SamplingBatch([item.request for _, item in sample_items])
        sampled = self.sampler(logits, batch)
        for (_, item), token, logprobs in zip(sample_items, sampled.token_ids, sampled.logprobs):
            result.sampled[item.request.request_id] = token
            if logprobs is not None:
                result.logprobs[item.request.request_id] = logprobs
        return result

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor, query_start: list[int],
                         result: ModelRunnerOutput) -> None:
        for i, item in enumerate(sched.scheduled):
            request = item.request
            k = request.sampling_params.prompt_logprobs
            n_prompt = request.num_prompt_tokens
            if k is None or item.start >= n_prompt or request.num_preemptions:
                continue
            entries: list[TokenLogprobs | None] = [None] if item.start == 0 else []
            # Position p predicts prompt token p + 1.
            last = min(item.start + item.num_new_tokens, n_prompt - 1)
            if last > item.start:
                rows = hidden[query_start[i]:query_start[i] + (last - item.start)]
                next_tokens = request.prompt_token_ids[item.start + 1:last + 1]
                entries.extend(prompt_logprobs_for(self.model.compute_logits(rows), next_tokens, k))
            result.prompt_logprobs[request.request_id] = entries
