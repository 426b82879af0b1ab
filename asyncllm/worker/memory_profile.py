"""How many KV blocks fit on a GPU: `gpu_memory_utilization` of the card, less what is in use after
the weights are loaded, less the activation peak of the largest step (vLLM's profile_run).

The peak is measured, not guessed: one dummy step of `max_num_batched_tokens` prompt tokens (in
sequences of at most max_model_len) runs through the model into a throw-away KV cache of just
the blocks it needs, then the logits of `max_num_seqs` rows, and torch's allocator reports the
most it held above what it held before. The same dummy step runs on the CPU (no peak to read
there), which is how the tests check it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncllm.model.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class DummyStep:
    """The profiled step's shape."""
    tokens: int
    sequence_lengths: list[int]
    blocks: int  # KV blocks of the throw-away cache


def dummy_step_shape(max_tokens: int, max_model_len: int, block_size: int) -> DummyStep:
    """max_tokens prompt tokens in whole sequences of at most max_model_len."""
    if max_tokens < 1 or max_model_len < 1:
        raise ValueError("the profiled step needs at least one token")
    lengths = [max_model_len] * (max_tokens // max_model_len)
    if max_tokens % max_model_len:
        lengths.append(max_tokens % max_model_len)
    return DummyStep(max_tokens, lengths, sum(-(-n // block_size) for n in lengths))


def dummy_batch(spec, sequences: list[tuple[int, int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """A step of made-up requests over a throw-away cache: each (context length after the step,
    new tokens), decodes (one new token after a context) first, each request on blocks of its own.
    → (input ids, positions, metadata, the blocks the cache needs)."""
    num_decodes = 0
    while num_decodes < len(sequences) and sequences[num_decodes][1] == 1 and sequences[num_decodes][0] > 1:
        num_decodes += 1
    starts, tables, slots, positions = [0], [], [], []
    first_block = 0
    width = max(-(-context // spec.block_size) for context, _ in sequences)
    for context, new in sequences:
        blocks = -(-context // spec.block_size)
        tables.append(list(range(first_block, first_block + blocks)) + [0] * (width - blocks))
        slots += [first_block * spec.block_size + i for i in range(context - new, context)]
        positions += list(range(context - new, context))
        starts.append(starts[-1] + new)
        first_block += blocks
    lengths = [context for context, _ in sequences]
    meta = AttentionMetadata(
        num_decodes=num_decodes, query_start_loc=starts, seq_lens=lengths,
        seq_lens_tensor=torch.tensor(lengths, dtype=torch.long, device=device),
        block_tables=torch.tensor(tables, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
    input_ids = torch.zeros(starts[-1], dtype=torch.long, device=device)
    return input_ids, torch.tensor(positions, dtype=torch.long, device=device), meta, first_block


@torch.inference_mode()
def run_dummy_step(model: torch.nn.Module, spec, shape: DummyStep, logit_rows: int,
                   device: torch.device) -> torch.Tensor:
    """One prompt step of `shape` through `model` (K/V into a cache of shape.blocks blocks that is
    dropped afterwards), then the logits of `logit_rows` rows. → the logits."""
    input_ids, positions, meta, blocks = dummy_batch(spec, [(n, n) for n in shape.sequence_lengths], device)
    hidden = model(input_ids, positions, spec.allocate(blocks, device, False), meta)
    rows = hidden[-min(logit_rows, shape.tokens):]
    return model.compute_logits(rows)


def activation_peak_bytes(model: torch.nn.Module, spec, shape: DummyStep, logit_rows: int,
                          device: torch.device) -> int:
    """What the largest step holds at its peak beyond what was allocated before it (CUDA)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_dummy_step(model, spec, shape, logit_rows, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return max(0, peak)


def kv_cache_budget(total: int, free: int, utilization: float, activation_peak: int) -> int:
    """Bytes left for the KV cache: the engine's share of the card, less everything in use now (its
    weights, the CUDA context, other processes) and the step's activation peak."""
    budget = int(total * utilization) - (total - free) - activation_peak
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x gpu_memory_utilization {utilization} "
            f"leaves {(int(total * utilization) - (total - free)) / 2**30:.2f} GiB after the weights and other "
            f"use, and the largest step's activations take {activation_peak / 2**30:.2f} GiB; raise "
            f"gpu_memory_utilization or lower max_num_batched_tokens")
    return budget
