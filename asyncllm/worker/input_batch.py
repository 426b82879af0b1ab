"""InputBatch: the worker's persistent per-request state, updated from each step's diffs.

A request arrives once (`NewRequestData`) and is kept until it finishes: its tokens (the
worker appends what it samples), its block table, its sampling row and its seeded
generator. Requests in the batch hold a row of the per-row tensors (block table,
temperature, top-k/p, min-p); a preempted request leaves the batch but keeps its state, so
its generator continues where it stopped. The sampler reads this, never a Request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asyncllm.core.sched_output import SchedulerOutput
from asyncllm.sampling.metadata import SamplingMetadata, SamplingRow


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt + outputs
    num_prompt_tokens: int
    sampling: SamplingRow
    block_ids: list[int]
    generator: torch.Generator | None = None
    skip_prompt_logprobs: bool = False  # recomputed after a preemption: its prompt logprobs were sent
    row: int = -1  # its row in the batch; -1 while preempted

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    def seeded_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.sampling.seed)
        return self.generator


@dataclass
class StepRows:
    """The logits rows of one step: which request and how many proposed tokens precede each."""

    states: list[CachedRequestState] = field(default_factory=list)
    draft_prefix: list[list[int]] = field(default_factory=list)


class InputBatch:
    def __init__(self, max_rows: int, max_blocks_per_request: int, device: torch.device):
        self.device = device
        self.requests: dict[str, CachedRequestState] = {}
        self._max_blocks = max_blocks_per_request
        self._free_rows: list[int] = []
        self._num_rows = 0
        self._alloc(max(1, max_rows))

    def _alloc(self, rows: int) -> None:
        old = self._num_rows
        def grow(tensor: torch.Tensor | None, shape, dtype, fill) -> torch.Tensor:
            new = torch.full(shape, fill, dtype=dtype)
            if tensor is not None:
                new[:old] = tensor
            return new
        self.block_table = grow(getattr(self, "block_table", None), (rows, self._max_blocks), torch.long, 0)
        self.temperature = grow(getattr(self, "temperature", None), (rows,), torch.float32, 1.0)
        self.top_k = grow(getattr(self, "top_k", None), (rows,), torch.long, 0)
        self.top_p = grow(getattr(self, "top_p", None), (rows,), torch.float32, 1.0)
        self.min_p = grow(getattr(self, "min_p", None), (rows,), torch.float32, 0.0)
        self._free_rows.extend(range(rows - 1, old - 1, -1))
        self._num_rows = rows

    # ------------------------------------------------------------------ diffs

    def update(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self._leave(state)
        for req_id in sched.preempted_ids:
            state = self.requests.get(req_id)
            if state is not None:
                self._leave(state)
                state.block_ids = []
                state.skip_prompt_logprobs = True
        for new in sched.new_requests:
            state = CachedRequestState(new.req_id, new.prompt_token_ids + new.output_token_ids,
                                       len(new.prompt_token_ids), new.sampling, list(new.block_ids))
            self.requests[new.req_id] = state
            self._enter(state)
        for diff in sched.cached_requests:
            state = self.requests[diff.req_id]
            if diff.resumed:
                state.block_ids = list(diff.new_block_ids)
                self._enter(state)
            else:
                n = len(state.block_ids)
                state.block_ids.extend(diff.new_block_ids)
                self.block_table[state.row, n:n + len(diff.new_block_ids)] = torch.tensor(diff.new_block_ids)

    def _enter(self, state: CachedRequestState) -> None:
        if not self._free_rows:
            self._alloc(self._num_rows * 2)
        row = state.row = self._free_rows.pop()
        p = state.sampling
        self.block_table[row, :len(state.block_ids)] = torch.tensor(state.block_ids, dtype=torch.long)
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p

    def _leave(self, state: CachedRequestState) -> None:
        if state.row >= 0:
            self._free_rows.append(state.row)
            state.row = -1

    # ------------------------------------------------------------------ reads

    def block_table_for(self, states: list[CachedRequestState]) -> torch.Tensor:
        width = max(len(s.block_ids) for s in states)
        rows = torch.tensor([s.row for s in states], dtype=torch.long)
        return self.block_table[rows, :width]

    def sampling_metadata(self, step: StepRows) -> SamplingMetadata:
        states, prefix = step.states, step.draft_prefix
        rows = torch.tensor([s.row for s in states], dtype=torch.long)
        keep = frozenset(i for i, d in enumerate(prefix) if states[i].sampling.seed is not None
                         and (d or (i + 1 < len(states) and states[i + 1] is states[i])))
        return SamplingMetadata(
            params=[s.sampling for s in states],
            prompt_tokens=lambda i: states[i].prompt_token_ids,
            output_tokens=lambda i: states[i].token_ids[states[i].num_prompt_tokens:] + prefix[i],
            num_output_tokens=[s.num_tokens - s.num_prompt_tokens + len(d) for s, d in zip(states, prefix)],
            temperature=self.temperature[rows], top_k=self.top_k[rows], top_p=self.top_p[rows],
            min_p=self.min_p[rows],
            generator=lambda i: states[i].seeded_generator(self.device),
            keep_generator_state=keep,
            req_ids=[s.req_id for s in states],
        )
