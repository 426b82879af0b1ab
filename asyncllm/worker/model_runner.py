"""ModelRunner: owns the model, the paged KV cache and the input batch; a step's data → tokens.

It applies the step's diffs to its InputBatch, flattens the scheduled requests into one
varlen batch (ids, positions, slot mapping, block tables), runs one forward, computes logits
only at the rows that sample (a request verifying k proposed tokens has k + 1 such rows;
prompt positions too for prompt logprobs), samples, and keeps the longest run of proposed
tokens the samples agree with. If the batch fails, each request runs alone so only the
faulty one fails. Embedding requests sample nothing: their prompt's hidden states are
pooled (`Pooler`) and the vector handed back when the last chunk has run.
"""
from __future__ import annotations

import logging
import math
import mmap
import time
from dataclasses import dataclass

import torch

from asyncllm.core.sched_output import (
    GrammarOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from asyncllm.lora.manager import LoRAManager
from asyncllm.model.layers.attention import AttentionMetadata
from asyncllm.model.parallel import SINGLE_STAGE
from asyncllm.multimodal.inputs import ImageEmbeds
from asyncllm.outputs import TokenLogprobs
from asyncllm.pooling.pooler import Pooler
from asyncllm.sampling.sampler import Sampler, prompt_logprobs_for
from asyncllm.spec_decode.draft_model import DraftModel
from asyncllm.worker.cuda_graphs import DecodeGraphs
from asyncllm.worker.input_batch import CachedRequestState, InputBatch, StepRows
from asyncllm.worker.staging import HostToDeviceStaging

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

    def allocate(self, num_blocks: int, device: torch.device, prefault: bool) -> list[torch.Tensor]:
        """One zeroed [2, num_blocks, block_size, heads, head_dim] cache per layer (`_zeros`)."""
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return [_zeros(shape, self.dtype, device, prefault) for _ in range(self.num_layers)]


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
    def __init__(self, model: torch.nn.Module, spec: KVCacheSpec, num_blocks: int, max_model_len: int,
                 max_num_seqs: int, device: torch.device, seed: int, prefault: bool = False,
                 pooler: Pooler | None = None, lora: LoRAManager | None = None,
                 draft: tuple[torch.nn.Module, KVCacheSpec] | None = None):
        """`draft`: speculative decoding's draft model and its K/V per block, paged like the target's."""
        self.model = model
        self.spec = spec
        self.device = device
        self.num_blocks = num_blocks
        started = time.perf_counter()
        self.kv_caches = spec.allocate(num_blocks, device, prefault)
        logger.info("KV cache: %d blocks x %d tokens (%.0f MiB%s) in %.2fs", num_blocks, spec.block_size,
                    num_blocks * spec.bytes_per_block / 2**20, ", prefaulted" if prefault else "",
                    time.perf_counter() - started)
        # Room for the proposed tokens past max_model_len's last block too.
        self.batch = InputBatch(max_num_seqs, -(-max_model_len // spec.block_size) + 1, spec.block_size, device)
        self.max_model_len = max_model_len
        self.sampler = Sampler(seed, device)
        self.pooler = pooler
        self.lora = lora
        self.draft: DraftModel | None = None
        if draft is not None:
            model_d, spec_d = draft
            self.draft = DraftModel(model_d, spec_d.allocate(num_blocks, device, prefault), spec_d.block_size, device)
        ctx = getattr(model, "ctx", None)
        self.pipeline = ctx.pipeline if ctx is not None else SINGLE_STAGE
        # LLaVA on the stage where tokens enter: image placeholders take the images' features.
        self.takes_images = getattr(model, "vision_tower", None) is not None
        # LongRoPE: sequences longer than this read the long factors' rows of the rotary table.
        rotary = getattr(model, "rotary", None)
        self.long_rope_from: int | None = rotary.rope.long_rope_from if rotary is not None else None
        self.decode_graphs: DecodeGraphs | None = None
        self.staging = HostToDeviceStaging(device)  # the step's inputs in one pinned copy on CUDA

    def enable_decode_graphs(self, sizes: list[int], capture: bool) -> DecodeGraphs:
        """Pure-decode steps of up to max(sizes) requests replay CUDA graphs (capture=False: the same
        padded static buffers run eagerly, for checking without CUDA; worker/cuda_graphs.py)."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, sizes, self.batch.block_table.shape[1],
                                          self.device, capture)
        return self.decode_graphs

    def release(self) -> None:
        self.decode_graphs = None
        self.kv_caches = []

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.batch.update(sched)
        if sched.copy_blocks:
            self._copy_blocks(sched.copy_blocks)
        items = [(self.batch.requests[s.req_id], s) for s in sched.scheduled]
        if not self.pipeline.is_last:  # a stage that does not sample: the tokens sampled since it last ran
            for state, item in items:
                if item.new_token_ids:
                    self.batch.append_tokens(state, item.new_token_ids)
        if not items:
            return ModelRunnerOutput()
        masks = _grammar_masks(sched.grammar)
        if not self.pipeline.is_single:
            # Every stage must run the same batches: a failure is the engine's, not one request's.
            return self._run(items, masks)
        try:
            return self._run(items, masks)
        except Exception:  # noqa: BLE001 - isolated below, request by request
            logger.warning("a batch of %d requests failed; running each alone", len(items), exc_info=True)
            return self._run_isolated(items, masks)

    def _run_isolated(self, items: list[tuple[CachedRequestState, ScheduledRequest]],
                      masks: dict[str, torch.Tensor]) -> ModelRunnerOutput:
        """Re-running is safe: a step writes each token's K/V to the same slot with the same
        values, and the cache pages of one request are never read by another's failure."""
        merged = ModelRunnerOutput()
        for item in items:
            try:
                part = self._run([item], masks)
            except Exception as exc:  # noqa: BLE001 - this request is the faulty one
                merged.failed[item[1].req_id] = f"{type(exc).__name__}: {exc}"
                continue
            merged.req_ids += part.req_ids
            merged.sampled_token_ids += part.sampled_token_ids
            merged.logprobs.update(part.logprobs)
            merged.prompt_logprobs.update(part.prompt_logprobs)
            merged.pooled.update(part.pooled)
        return merged

    def _run(self, items: list[tuple[CachedRequestState, ScheduledRequest]],
             masks: dict[str, torch.Tensor]) -> ModelRunnerOutput:
        flat = self.batch.flat_inputs(items)
        query_start = flat.query_start
        dev = self.device
        num_decodes, attn_starts, seq_lens, table_states = _attention_rows(items, flat)
        input_ids, positions, seq_lens_tensor, block_tables, slot_mapping = self.staging.to_device(
            flat.input_ids, flat.positions, torch.tensor(seq_lens, dtype=torch.long),
            self.batch.block_table_for(table_states), flat.slot_mapping)
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=attn_starts,
            seq_lens=seq_lens,
            seq_lens_tensor=seq_lens_tensor,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
        )
        if self.lora is not None:
            self.lora.prepare_step([state.lora for state, _ in items], query_start)
        image_embeds = self._image_embeds(items, query_start) if self.takes_images else None
        extra = {} if image_embeds is None else {"image_embeds": image_embeds}
        rope_positions = self._rope_positions(items, query_start, positions)
        graphs = self.decode_graphs
        if graphs is not None and num_decodes == len(seq_lens) == len(items) <= graphs.max_size and not extra:
            hidden = graphs.run(input_ids, rope_positions, meta.seq_lens_tensor, meta.block_tables, meta.slot_mapping)
        else:
            hidden = self.model(input_ids, rope_positions, self.kv_caches, meta, **extra)
        if self.draft is not None:  # the draft's cache of the same tokens (its next proposals read it)
            self.draft.forward(input_ids, positions, meta)

        result = ModelRunnerOutput()
        if hidden is not None:  # None: a pipeline stage before the last (it sent its output on)
            self._prompt_logprobs(items, hidden, query_start, result)
            self._pool(items, hidden, query_start, result)
        # Logits rows: a sampling request's last row, and before it one per proposed token.
        rows: list[int] = []
        step = StepRows()
        grammar_rows, grammar_masks = [], []
        sampling: list[tuple[CachedRequestState, ScheduledRequest]] = []
        for i, (state, item) in enumerate(items):
            if not item.samples or state.pooling is not None:
                continue
            sampling.append((state, item))
            k = len(item.spec_token_ids)
            for j in range(k + 1):
                if item.req_id in masks and j < masks[item.req_id].shape[0]:  # the grammar's mask of this row
                    grammar_rows.append(len(rows))
                    grammar_masks.append(masks[item.req_id][j])
                rows.append(query_start[i + 1] - 1 - k + j)
                step.states.append(state)
                step.draft_prefix.append(item.spec_token_ids[:j])
        if not rows:
            return result
        if hidden is not None:
            self._sample(sampling, hidden[torch.tensor(rows, device=dev)], step, grammar_rows, grammar_masks,
                         result)
        # Nothing is appended before the whole batch has sampled (the stages before the last learn
        # these tokens with their next step: ScheduledRequest.new_token_ids).
        for (state, _), tokens in zip(sampling, result.sampled_token_ids):
            self.batch.append_tokens(state, tokens)
        if self.draft is not None and hidden is not None:
            self._draft_proposals(sampling, result)
        return result

    def _rope_positions(self, items: list[tuple[CachedRequestState, ScheduledRequest]], query_start: list[int],
                        positions: torch.Tensor) -> torch.Tensor:
        """The rotary table's rows of the step's tokens: their positions, shifted past the short rows
        for a sequence longer than LongRoPE's original context (whose K/V the scheduler has computed on
        the long factors from its start: SchedulerConfig.long_rope_from)."""
        limit = self.long_rope_from
        spans = [] if limit is None else [(query_start[i], query_start[i + 1])
                                          for i, (state, _) in enumerate(items) if state.num_tokens > limit]
        if not spans:
            return positions
        shifted = positions.clone()
        for start, end in spans:
            shifted[start:end] += limit
        return shifted

    def _image_embeds(self, items: list[tuple[CachedRequestState, ScheduledRequest]],
                      query_start: list[int]) -> ImageEmbeds | None:
        """The step's rows that hold image placeholders, and their features: each image through the
        vision tower on the first step that reaches it (every such image of the step in one batch),
        then kept with its request, so a chunk boundary inside an image costs nothing."""
        spans = []  # (state, image index, first feature row, end feature row, first flat row)
        for i, (state, item) in enumerate(items):
            start, end = item.start, item.start + item.num_new_tokens
            for k, image in enumerate(state.images):
                if image.overlaps(start, end):
                    lo, hi = max(start, image.offset), min(end, image.offset + image.length)
                    spans.append((state, k, lo - image.offset, hi - image.offset, query_start[i] + lo - start))
        if not spans:
            return None
        missing = [(state, k) for state, k, *_ in spans if k not in state.image_features]
        if missing:
            pixels = torch.stack([state.images[k].pixels() for state, k in missing]).to(self.device)
            for (state, k), features in zip(missing, self.model.image_features(pixels)):
                state.image_features[k] = features
        rows = torch.cat([torch.arange(flat, flat + hi - lo) for _, _, lo, hi, flat in spans]).to(self.device)
        values = torch.cat([state.image_features[k][lo:hi] for state, k, lo, hi, _ in spans])
        return ImageEmbeds(rows, values)

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write of cached partial blocks: each layer's K/V of every source block into its
        destination (the draft's too), before the step writes anything."""
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for cache in self.kv_caches + (self.draft.kv_caches if self.draft is not None else []):
            cache[:, dst] = cache[:, src]

    def _draft_proposals(self, sampling: list[tuple[CachedRequestState, ScheduledRequest]],
                         result: ModelRunnerOutput) -> None:
        """The draft's next proposals for the requests the scheduler asked, none at or past
        max_model_len (grouped by how many)."""
        by_count: dict[int, list[tuple[CachedRequestState, ScheduledRequest]]] = {}
        for state, item in sampling:
            k = min(item.num_draft, self.max_model_len - state.num_tokens)
            if k > 0:
                by_count.setdefault(k, []).append((state, item))
        for k, group in by_count.items():
            states = [state for state, _ in group]
            proposals = self.draft.propose(states, self.batch.block_table_for(states).to(self.device), k)
            for (_, item), proposal in zip(group, proposals):
                result.draft_token_ids[item.req_id] = proposal

    def _sample(self, sampling: list[tuple[CachedRequestState, ScheduledRequest]], hidden_rows: torch.Tensor,
                step: StepRows, grammar_rows: list[int], grammar_masks: list[torch.Tensor],
                result: ModelRunnerOutput) -> None:
        """Samples every logits row, then keeps each request's longest run of proposed tokens the
        samples agree with (+ the next sample) in `result`, in `sampling`'s order."""
        logits = self.model.compute_logits(hidden_rows)
        metadata = self.batch.sampling_metadata(step)
        if grammar_rows:
            metadata.grammar_rows = grammar_rows
            metadata.grammar_bitmask = torch.stack(grammar_masks)
        sampled = self.sampler(logits, metadata)
        row = 0
        for state, item in sampling:
            drafts = item.spec_token_ids
            targets = sampled.token_ids[row:row + len(drafts) + 1]
            accepted = 0
            while accepted < len(drafts) and targets[accepted] == drafts[accepted]:
                accepted += 1
            if accepted < len(drafts) and row + accepted in sampled.generator_states:
                # The rejected rows' draws never happened for this seeded stream.
                state.generator.set_state(sampled.generator_states[row + accepted])
            result.req_ids.append(item.req_id)
            result.sampled_token_ids.append(targets[:accepted + 1])
            logprobs = sampled.logprobs[row:row + accepted + 1]
            if logprobs[0] is not None:
                result.logprobs[item.req_id] = logprobs
            row += len(drafts) + 1

    def _pool(self, items: list[tuple[CachedRequestState, ScheduledRequest]], hidden: torch.Tensor,
              query_start: list[int], result: ModelRunnerOutput) -> None:
        """Embedding requests: gather this chunk; the last one hands the vector back."""
        for i, (state, item) in enumerate(items):
            if state.pooling is None:
                continue
            if self.pooler is None:
                raise RuntimeError("an embedding request reached a runner without a pooler")
            rows = hidden[query_start[i]:query_start[i + 1]]
            self.pooler.add_chunk(state.pooling, rows, item.start)
            if item.start + item.num_new_tokens >= state.num_prompt_tokens:
                result.pooled[item.req_id] = self.pooler.finish(state.pooling, rows, state.num_prompt_tokens)

    def _prompt_logprobs(self, items: list[tuple[CachedRequestState, ScheduledRequest]], hidden: torch.Tensor,
                         query_start: list[int], result: ModelRunnerOutput) -> None:
        for i, (state, item) in enumerate(items):
            k = state.sampling.prompt_logprobs
            n_prompt = state.num_prompt_tokens
            if k is None or item.start >= n_prompt or state.skip_prompt_logprobs:
                continue
            entries: list[TokenLogprobs | None] = [None] if item.start == 0 else []
            # Position p predicts prompt token p + 1.
            last = min(item.start + item.num_new_tokens, n_prompt - 1)
            if last > item.start:
                rows = hidden[query_start[i]:query_start[i] + (last - item.start)]
                next_tokens = state.token_ids[item.start + 1:last + 1]
                entries.extend(prompt_logprobs_for(self.model.compute_logits(rows), next_tokens, k))
            result.prompt_logprobs[item.req_id] = entries


def _attention_rows(items: list[tuple[CachedRequestState, ScheduledRequest]], flat) -> tuple[
        int, list[int], list[int], list[CachedRequestState]]:
    """Attention's view of the step: a decode that verifies k proposed tokens is k + 1 decode rows
    (query j sees the context up to its own position; every row's K/V is written before any row
    attends), so verification runs the decode kernels, and the one-call decoder for 1-8 rows,
    with the very arithmetic of plain decoding. → (num_decodes, query starts, seq_lens, the
    state whose block table each attention row reads)."""
    if not any(item.spec_token_ids for _, item in items):
        return flat.num_decodes, flat.query_start, flat.seq_lens, [state for state, _ in items]
    starts, seq_lens, states = [0], [], []
    num_decodes = 0
    for i, (state, item) in enumerate(items):
        n = item.num_new_tokens
        decode_like = n == 1 or bool(item.spec_token_ids)
        if decode_like and num_decodes == len(seq_lens):  # still in the leading run of decode rows
            for j in range(n):
                starts.append(starts[-1] + 1)
                seq_lens.append(item.start + j + 1)
                states.append(state)
            num_decodes += n
        else:
            starts.append(starts[-1] + n)
            seq_lens.append(flat.seq_lens[i])
            states.append(state)
    return num_decodes, starts, seq_lens, states


def _grammar_masks(grammar: GrammarOutput | None) -> dict[str, torch.Tensor]:
    """Request id → its bitmask rows [1 + proposals, words], from the bytes the engine sent."""
    if grammar is None or not grammar.req_ids:
        return {}
    counts = grammar.num_rows or [1] * len(grammar.req_ids)
    bitmask = torch.frombuffer(bytearray(grammar.bitmask), dtype=torch.int32).view(sum(counts), grammar.words)
    return dict(zip(grammar.req_ids, bitmask.split(counts)))
