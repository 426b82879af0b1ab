"""InputBatch: the worker's persistent per-request state, updated from each step's diffs.

A request arrives once (`NewRequestData`) and is kept until it finishes: its tokens (the
worker appends what it samples), its block table, its sampling row and its seeded
generator. Requests in the batch hold a row of the per-row tensors (token ids, token counts,
block table, temperature, top-k/p, min-p, penalties), as vLLM's InputBatch does; a
preempted request leaves the batch but keeps its state, so its generator continues where it
stopped, and gets a row again on resume. A step's flat inputs (ids, positions, slots) are
gathered from those tensors with numpy views (no per-token Python), and the sampler reads
metadata gathered from them, never a Request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from asyncllm.core.sched_output import ScheduledRequest, SchedulerOutput
from asyncllm.lora.request import LoRARequest
from asyncllm.multimodal.inputs import ImageInput
from asyncllm.pooling.pooler import PoolingState
from asyncllm.sampling.metadata import PenaltyInputs, SamplingMetadata, SamplingRow


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
    pooling: PoolingState | None = None  # an embedding request: what its chunks gathered so far
    lora: LoRARequest | None = None  # its adapter (None: the base model)
    images: list[ImageInput] = field(default_factory=list)  # its prompt's images (LLaVA)
    # Each image's features once computed (by index in `images`), kept until the request leaves, so
    # prompt chunks and a recompute after preemption run the vision tower once per image.
    image_features: dict[int, torch.Tensor] = field(default_factory=dict)

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


@dataclass
class FlatInputs:
    """One step's scheduled requests flattened into a varlen batch."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: where each token's K/V goes in the paged cache
    query_start: list[int]  # request i's tokens are [query_start[i], query_start[i + 1])
    seq_lens: list[int]  # request i's length after this step
    num_decodes: int  # the leading requests with exactly one new token


class InputBatch:
    def __init__(self, max_rows: int, max_blocks_per_request: int, block_size: int, device: torch.device):
        self.device = device
        self.block_size = block_size
        self.requests: dict[str, CachedRequestState] = {}
        self._max_blocks = max_blocks_per_request
        self._max_tokens = max_blocks_per_request * block_size  # proposed tokens included
        self._free_rows: list[int] = []
        self._num_rows = 0
        self._alloc(max(1, max_rows))

    def _alloc(self, rows: int) -> None:
        old = self._num_rows
        def grow(name: str, shape, dtype, fill) -> torch.Tensor:
            new = torch.full(shape, fill, dtype=dtype)
            if old:
                new[:old] = getattr(self, name)
            return new
        self.token_ids = grow("token_ids", (rows, self._max_tokens), torch.int32, 0)
        self.num_tokens = grow("num_tokens", (rows,), torch.long, 0)
        self.num_prompt_tokens = grow("num_prompt_tokens", (rows,), torch.long, 0)
        self.block_table = grow("block_table", (rows, self._max_blocks), torch.long, 0)
        self.temperature = grow("temperature", (rows,), torch.float32, 1.0)
        self.top_k = grow("top_k", (rows,), torch.long, 0)
        self.top_p = grow("top_p", (rows,), torch.float32, 1.0)
        self.min_p = grow("min_p", (rows,), torch.float32, 0.0)
        self.presence_penalty = grow("presence_penalty", (rows,), torch.float32, 0.0)
        self.frequency_penalty = grow("frequency_penalty", (rows,), torch.float32, 0.0)
        self.repetition_penalty = grow("repetition_penalty", (rows,), torch.float32, 1.0)
        # numpy views of the same memory: indexing them costs ~1 us where torch's costs ~10.
        self._tokens_np = self.token_ids.numpy()
        self._num_tokens_np = self.num_tokens.numpy()
        self._block_table_np = self.block_table.numpy()
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
                if state.pooling is not None:
                    state.pooling.reset()  # its prompt is computed again from the start
        for new in sched.new_requests:
            state = CachedRequestState(new.req_id, new.prompt_token_ids + new.output_token_ids,
                                       len(new.prompt_token_ids), new.sampling, list(new.block_ids),
                                       pooling=PoolingState() if new.pooling else None, lora=new.lora,
                                       images=list(new.images))
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
                self._block_table_np[state.row, n:n + len(diff.new_block_ids)] = diff.new_block_ids

    def _enter(self, state: CachedRequestState) -> None:
        if not self._free_rows:
            self._alloc(self._num_rows * 2)
        row = state.row = self._free_rows.pop()
        p = state.sampling
        self._block_table_np[row, :len(state.block_ids)] = state.block_ids
        self._tokens_np[row, :state.num_tokens] = state.token_ids
        self.num_tokens[row] = state.num_tokens
        self.num_prompt_tokens[row] = state.num_prompt_tokens
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.repetition_penalty[row] = p.repetition_penalty

    def append_tokens(self, state: CachedRequestState, tokens: list[int]) -> None:
        n = state.num_tokens
        self._tokens_np[state.row, n:n + len(tokens)] = tokens
        self._num_tokens_np[state.row] = n + len(tokens)
        state.token_ids.extend(tokens)

    def _leave(self, state: CachedRequestState) -> None:
        if state.row >= 0:
            self._free_rows.append(state.row)
            state.row = -1

    # ------------------------------------------------------------------ reads

    def flat_inputs(self, items: list[tuple[CachedRequestState, ScheduledRequest]]) -> FlatInputs:
        """Positions [start, start + n) of each request; proposed tokens go after its last token."""
        bs = self.block_size
        for state, item in items:
            if item.spec_token_ids:
                self._tokens_np[state.row, state.num_tokens:state.num_tokens + len(item.spec_token_ids)] = \
                    item.spec_token_ids
        rows = np.fromiter((s.row for s, _ in items), dtype=np.int64, count=len(items))
        starts = np.fromiter((i.start for _, i in items), dtype=np.int64, count=len(items))
        counts = np.fromiter((i.num_new_tokens for _, i in items), dtype=np.int64, count=len(items))
        ends = np.cumsum(counts)
        row_of_token = np.repeat(rows, counts)
        positions = np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1])
        input_ids = self._tokens_np[row_of_token, positions].astype(np.int64)
        slots = self._block_table_np[row_of_token, positions // bs] * bs + positions % bs
        num_decodes = int(np.argmin(counts == 1)) if (counts != 1).any() else len(items)
        return FlatInputs(torch.from_numpy(input_ids), torch.from_numpy(positions), torch.from_numpy(slots),
                          [0] + ends.tolist(), (starts + counts).tolist(), num_decodes)

    def block_table_for(self, states: list[CachedRequestState]) -> torch.Tensor:
        width = max(len(s.block_ids) for s in states)
        rows = torch.tensor([s.row for s in states], dtype=torch.long)
        return self.block_table[rows, :width]

    def sampling_metadata(self, step: StepRows) -> SamplingMetadata:
        states, prefix = step.states, step.draft_prefix
        rows = torch.tensor([s.row for s in states], dtype=torch.long)
        keep = frozenset(i for i, d in enumerate(prefix) if states[i].sampling.seed is not None
                         and (d or (i + 1 < len(states) and states[i + 1] is states[i])))
        penalties = None
        if any(s.sampling.has_penalty for s in states):
            penalties = self._penalty_inputs(rows, prefix)
        return SamplingMetadata(
            params=[s.sampling for s in states],
            output_tokens=lambda i: states[i].token_ids[states[i].num_prompt_tokens:] + prefix[i],
            num_output_tokens=[s.num_tokens - s.num_prompt_tokens + len(d) for s, d in zip(states, prefix)],
            temperature=self.temperature[rows], top_k=self.top_k[rows], top_p=self.top_p[rows],
            min_p=self.min_p[rows], penalties=penalties,
            generator=lambda i: states[i].seeded_generator(self.device),
            keep_generator_state=keep,
            req_ids=[s.req_id for s in states],
        )

    def _penalty_inputs(self, rows: torch.Tensor, prefix: list[list[int]]) -> PenaltyInputs:
        """The tokens each row has seen, from the token tensor: a row's prompt, and its outputs
        followed by the proposed tokens before it (written here, so the order of calls is free)."""
        seen = self.num_tokens[rows] + torch.tensor([len(d) for d in prefix], dtype=torch.long)
        tokens = self.token_ids[rows, :int(seen.max())].long()
        for i, draft in enumerate(prefix):
            if draft:
                n = int(self.num_tokens[rows[i]])
                tokens[i, n:n + len(draft)] = torch.tensor(draft, dtype=torch.long)
        position = torch.arange(tokens.shape[1])[None, :]
        prompt_len = self.num_prompt_tokens[rows][:, None]
        return PenaltyInputs(
            prompt_token_ids=torch.where(position < prompt_len, tokens, -1),
            output_token_ids=torch.where((position >= prompt_len) & (position < seen[:, None]), tokens, -1),
            presence=self.presence_penalty[rows], frequency=self.frequency_penalty[rows],
            repetition=self.repetition_penalty[rows])
