"""Scheduler: continuous batching with chunked prefill, prefix caching and preemption.

There are no prefill/decode phases. Every request has `num_computed_tokens`; each step
spends one token budget on running requests first (decodes, then unfinished prompt
chunks), then admits waiting requests, chunking their prompts to fit the budget. When
KV blocks run out, the lowest-priority / newest running request is preempted: its blocks
are freed and it is recomputed later (prefix caching usually makes that cheap).

Its output is plain data for the workers: a request's data the first time it runs, then
only diffs (new block ids, a resumption), and the ids that finished or were
preempted since the last step. A decode may carry proposed tokens to verify (from a
`Proposer`): slots are allocated for them, and `num_computed_tokens` rolls back by the
rejected ones when the step's tokens come back.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Protocol

from asyncllm.core.kv_cache_manager import KVCacheManager
from asyncllm.core.sched_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
)
from asyncllm.request import Request, RequestStatus
from asyncllm.sampling.metadata import SamplingRow
from asyncllm.sampling.structured import GrammarError
from asyncllm.spec_decode.acceptance import AcceptanceGate


class Proposer(Protocol):
    """Proposes up to `k` next tokens of a decoding request, to be verified in its next step."""

    def propose(self, request: Request, k: int) -> list[int]:
        ...

    def finished(self, request: Request) -> None:
        """The request has ended (finished, aborted or failed): drop what was kept for it."""
        ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    num_speculative_tokens: int = 0  # most proposed tokens per request per step (0: none)
    speculative_disable_batch_size: int | None = None  # no proposals while this many requests run
    speculative_disable_acceptance_rate: float | None = None  # pause a request's proposals below this rate
    pooling_uses_cache: bool = True  # False when the pooler reads every prompt position (MEAN, CLS)
    max_loras: int = 0  # most distinct LoRA adapters among running requests (0: LoRA off)
    max_in_flight: int = 1  # batches in flight at once (pipeline parallel: one per stage)
    draft_in_worker: bool = False  # a draft model in the workers proposes (it needs k slots ahead)
    vocab_size: int = 0  # the model's (grammar masks of proposals)
    # LongRoPE (Phi-3): a sequence longer than this runs on the long factors, and one that grows past
    # it is computed again from the start on them, as transformers does (None: no such switch).
    long_rope_from: int | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, proposer: Proposer | None = None):
        self.config = config
        self.kv = kv
        self.proposer = proposer
        # What the workers hold: request id → how many of its block ids they have (absent: not sent
        # yet). Finished and preempted ids since the last step go out with the next one.
        self._sent_blocks: dict[str, int] = {}
        self._resumed: set[str] = set()
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []
        self.requests: dict[str, Request] = {}
        self._acceptance: dict[str, AcceptanceGate] = {}  # by request id, once it has proposed
        # Several batches in flight (pipeline parallel): the requests of the batches not yet back,
        # which wait for their tokens, and how many output tokens the workers were sent of each.
        self.in_flight: set[str] = set()
        self._sent_tokens: dict[str, int] = {}
        self.waiting: list[tuple[tuple, Request]] = []  # sorted by (priority, arrival, seq)
        self.running: list[Request] = []
        self._seq = itertools.count()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        key = (request.priority, request.arrival_time, next(self._seq))
        bisect.insort(self.waiting, (key, request), key=lambda item: item[0])

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Ends requests from outside a step (abort, stop string); frees their blocks now."""
        finished = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting = [(k, r) for k, r in self.waiting if r is not request]
            request.status = status
            self._release(request)
            finished.append(request)
        return finished

    def _release(self, request: Request) -> None:
        self.kv.free(request)
        if self.proposer is not None:
            self.proposer.finished(request)
        self._acceptance.pop(request.request_id, None)
        self._sent_tokens.pop(request.request_id, None)
        self.requests.pop(request.request_id, None)
        if self._sent_blocks.pop(request.request_id, None) is not None or request.request_id in self._resumed:
            self._finished_ids.append(request.request_id)
        self._resumed.discard(request.request_id)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        copies: list[tuple[int, int]] = []
        scheduled: list[ScheduledRequest] = []
        scheduled_set: set[str] = set()
        preempted: list[str] = []

        # Running requests: decodes (one known token left to compute) before prompt chunks; none
        # whose previous step is still in flight (pipeline parallel: its next token is unknown).
        in_flight = self.in_flight
        order = sorted((r for r in self.running if r.request_id not in in_flight),
                       key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        # Several batches in flight share the requests: each takes its share of them.
        max_seqs = self.config.max_num_seqs if self.config.max_in_flight == 1 else max(
            1, -(-(len(self.running) + len(self.waiting)) // self.config.max_in_flight))
        for request in order:
            if budget == 0 or len(scheduled) >= max_seqs:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._passed_short_rope(request):
                # Its K/V was computed on the short factors: the whole sequence again, on the long ones
                # (the waiting loop below may take it at once).
                self._preempt(request, recompute=True)
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            request.spec_token_ids = self._propose(request, num_new, budget)
            num_new += len(request.spec_token_ids)
            while not self.kv.allocate_slots(request, num_new + self._lookahead):
                victim = self._pick_victim(exclude=scheduled_set | in_flight)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new))
                scheduled_set.add(request.request_id)
                budget -= num_new

        # Waiting requests, while there is budget and room; none after a preemption (no room).
        position = 0
        while (position < len(self.waiting) and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs and len(scheduled) < max_seqs):
            request = self.waiting[position][1]
            if request.grammar is not None and request.grammar.guide is None:
                position += 1  # its grammar is still compiling: the others go ahead
                continue
            if not self._adapter_fits(request):
                position += 1  # max_loras other adapters are running: it waits for one of them to end
                continue
            limit = self.config.long_rope_from
            request.long_rope = limit is not None and request.num_tokens > limit  # before its blocks are hashed
            # Prompt logprobs, and MEAN/CLS pooling, need every position computed.
            use_cache = request.sampling_params.prompt_logprobs is None and (
                not request.pooling or self.config.pooling_uses_cache)
            hits, num_hit = self.kv.get_computed_blocks(request) if use_cache else ([], 0)
            # A cached partial block continuing those hits is copied, not computed again.
            source, num_copied = self.kv.get_partial_block(request, num_hit) if use_cache else (None, 0)
            num_new = request.num_tokens - num_hit - num_copied
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(request, num_copied + num_new + self._lookahead, hits):
                break
            if source is not None:
                copies.append((source.block_id, self.kv.req_blocks[request.request_id][len(hits)].block_id))
                num_hit += num_copied
            self.waiting.pop(position)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            if use_cache:
                self.kv.stats.queries += request.num_tokens
                self.kv.stats.hits += num_hit
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        # One-token queries first: the attention backend batches them as decodes.
        scheduled.sort(key=lambda s: s.num_new_tokens > 1)
        out = SchedulerOutput(scheduled, self.config.max_num_batched_tokens - budget, copy_blocks=copies)
        if scheduled:  # otherwise the diffs wait for the next step that runs
            self._add_worker_diffs(out)
        if self.config.max_in_flight > 1:
            in_flight.update(s.req_id for s in scheduled)
        return out

    def _adapter_fits(self, request: Request) -> bool:
        """Whether running it keeps the running requests within max_loras distinct adapters (the
        workers hold that many at once)."""
        if request.lora_request is None:
            return True
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        return request.lora_request.lora_int_id in running or len(running) < self.config.max_loras

    def _propose(self, request: Request, num_new: int, budget: int) -> list[int]:
        """Tokens to verify along with a decode (none for prompts), within the budget and
        max_model_len; a grammar-constrained request's only as far as its grammar allows them."""
        k = self.config.num_speculative_tokens
        if request.grammar is not None:
            request.grammar.spec_masks = None
        if self.proposer is None or k == 0 or num_new != 1:
            return []
        if not self._batch_allows_proposals():
            return []
        floor = self.config.speculative_disable_acceptance_rate
        if floor is not None:
            gate = self._acceptance.get(request.request_id)
            if gate is None:
                gate = self._acceptance[request.request_id] = AcceptanceGate(floor)
            if not gate.allows():
                return []
        k = min(k, budget - 1, self.config.max_model_len - request.num_tokens)
        if self.config.long_rope_from is not None and not request.long_rope:
            # Proposals verified on the short factors must all fit the original context (transformers
            # computes a longer sequence on the long ones).
            k = min(k, self.config.long_rope_from - request.num_tokens)
        proposals = list(self.proposer.propose(request, k)[:k]) if k > 0 else []
        if proposals and request.grammar is not None:
            proposals = proposals[:request.grammar.propose_along(proposals, self.config.vocab_size)]
        return proposals

    @property
    def _lookahead(self) -> int:
        """Slots past a step's tokens that a draft model writes its proposals' K/V into (at most a
        block: the workers' block tables hold one block past max_model_len)."""
        return min(self.config.num_speculative_tokens, self.kv.block_size) if self.config.draft_in_worker else 0

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        spec = request.spec_token_ids
        samples = request.num_computed_tokens + num_new - len(spec) == request.num_tokens
        item = ScheduledRequest(request.request_id, request.num_computed_tokens, num_new, list(spec), samples)
        if samples and self.config.draft_in_worker and self._may_propose(request):
            item.num_draft = self._lookahead  # the worker stops short of max_model_len
        return item

    def _may_propose(self, request: Request) -> bool:
        """Whether the next step of this request may verify proposals (the rules _propose applies
        that are known now): not a pooled request, the batch not too large."""
        return not request.pooling and self._batch_allows_proposals()

    def _batch_allows_proposals(self) -> bool:
        """disable_by_batch_size: no proposals while that many requests run."""
        limit = self.config.speculative_disable_batch_size
        return limit is None or len(self.running) < limit

    def _add_worker_diffs(self, out: SchedulerOutput) -> None:
        """The first step of a request carries its data; later steps only what changed (its start
    position travels in its ScheduledRequest)."""
        out.finished_req_ids, self._finished_ids = self._finished_ids, []
        out.preempted_ids, self._preempted_ids = self._preempted_ids, []
        for item in out.scheduled:
            rid = item.req_id
            request = self.requests[rid]
            block_ids = self.kv.block_ids(rid)
            sent = self._sent_blocks.get(rid)
            if sent is None and rid not in self._resumed:
                out.new_requests.append(NewRequestData(
                    rid, request.prompt_token_ids, list(request.output_token_ids),
                    SamplingRow.from_params(request.sampling_params, request.eos_token_ids, request.sample_seed),
                    block_ids, request.cache_salt, request.pooling, request.lora_request, request.images))
            elif sent is None:
                self._resumed.discard(rid)
                out.cached_requests.append(CachedRequestData(rid, block_ids, resumed=True))
            elif len(block_ids) > sent:  # a decode within its last block sends nothing
                out.cached_requests.append(CachedRequestData(rid, block_ids[sent:]))
            self._sent_blocks[rid] = len(block_ids)
            if self.config.max_in_flight > 1:  # pipeline stages before the last learn the sampled tokens here
                seen = self._sent_tokens.get(rid)
                if seen is not None:
                    item.new_token_ids = request.output_token_ids[seen:]
                self._sent_tokens[rid] = len(request.output_token_ids)

    def _pick_victim(self, exclude: set[str]) -> Request:
        """Lowest priority (largest value), then newest, among running requests not yet scheduled."""
        candidates = [r for r in self.running if r.request_id not in exclude]
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))

    def _passed_short_rope(self, request: Request) -> bool:
        limit = self.config.long_rope_from
        return limit is not None and not request.long_rope and request.num_tokens > limit

    def _preempt(self, request: Request, recompute: bool = False) -> None:
        """Frees a running request's blocks; it waits to be computed again from the start.
        `recompute`: not for room (LongRoPE's switch), so not counted as a preemption."""
        self.running.remove(request)
        self.kv.free(request)
        request.spec_token_ids = []
        request.draft_token_ids = []  # the draft's cache of it is gone with its blocks
        if self._sent_blocks.pop(request.request_id, None) is not None:
            self._preempted_ids.append(request.request_id)  # the workers keep its tokens and generator
            self._resumed.add(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        if not recompute:
            request.num_preemptions += 1
            self.num_preemptions += 1
        self._enqueue(request)

    # ------------------------------------------------------------------ update

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        self.in_flight.difference_update(item.req_id for item in sched.scheduled)
        sampled = dict(zip(result.req_ids, result.sampled_token_ids))
        outputs = []
        for item in sched.scheduled:
            request = self.requests.get(item.req_id)
            if request is None or request.is_finished or item.req_id in result.failed:
                continue
            tokens = sampled.get(item.req_id)
            # The proposed tokens the samples disagreed with were computed but are not the sequence.
            rejected = len(item.spec_token_ids) - (len(tokens) - 1) if tokens else 0
            gate = self._acceptance.get(item.req_id)
            if gate is not None and tokens:
                gate.record(len(item.spec_token_ids), len(tokens) - 1)
            request.num_computed_tokens += item.num_new_tokens - rejected
            request.spec_token_ids = []
            request.draft_token_ids = result.draft_token_ids.get(item.req_id, [])
            pooled = result.pooled.get(item.req_id)
            if pooled is not None:  # an embedding request is done once its prompt is
                request.status = RequestStatus.FINISHED_STOPPED
                self.running.remove(request)
                self._release(request)
                outputs.append(EngineCoreOutput(item.req_id, [], finish_reason="stop", pooled=pooled,
                                                num_cached_tokens=max(request.num_cached_tokens, 0)))
                continue
            prompt_lp = result.prompt_logprobs.get(item.req_id)
            if not tokens:
                if prompt_lp:
                    outputs.append(EngineCoreOutput(item.req_id, [], prompt_logprobs=prompt_lp))
                continue
            new_tokens = []
            grammar_error = None
            for token in tokens:  # a stop inside the run ends it there
                request.output_token_ids.append(token)
                new_tokens.append(token)
                if request.grammar is not None:
                    try:
                        request.grammar.accept(token)
                    except GrammarError as exc:  # the grammar cannot go on: this request fails, with why
                        grammar_error = exc
                        request.status = RequestStatus.FINISHED_ERROR
                        break
                self._check_stop(request, token)
                if request.is_finished:
                    break
            logprobs = result.logprobs.get(item.req_id)
            out = EngineCoreOutput(item.req_id, new_tokens,
                                   logprobs=logprobs[:len(new_tokens)] if logprobs is not None else None,
                                   prompt_logprobs=prompt_lp, num_cached_tokens=max(request.num_cached_tokens, 0),
                                   num_draft_tokens=len(item.spec_token_ids), num_accepted_tokens=len(tokens) - 1)
            if grammar_error is not None:
                out.error, out.exception = f"GrammarError: {grammar_error}", grammar_error
            if request.is_finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
                self.running.remove(request)
                self._release(request)
            outputs.append(out)
        return outputs

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling_params
        n_out = request.num_output_tokens
        if request.grammar is not None and token == request.grammar.eos_token_id:
            request.status = RequestStatus.FINISHED_STOPPED  # the structure is complete (even with ignore_eos)
            return
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return
        if n_out >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
