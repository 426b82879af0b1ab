"""OutputProcessor: EngineCoreOutputs (token ids) → RequestOutputs (text, logprobs, finish state).

It owns each user request's detokenizers and text, applies stop strings (telling the
caller which sequences to finish in the core), gathers the n samples of a request into
one RequestOutput, and shapes outputs by output_kind (CUMULATIVE, DELTA, FINAL_ONLY).
Embedding requests get their pooled vector truncated (`dimensions`) and normalised here.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import PreTrainedTokenizerBase

from asyncllm.core.sched_output import EngineCoreOutput
from asyncllm.engine.detokenizer import IncrementalDetokenizer
from asyncllm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    TokenLogprobs,
)
from asyncllm.pooling_params import PoolingParams
from asyncllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _Sequence:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # characters already delivered (DELTA)
    sent_tokens: int = 0


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    sent_prompt_logprobs: bool = False
    error: str | None = None
    exception: BaseException | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclass
class _PoolingRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: PoolingParams
    metrics: RequestMetrics


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]
    stopped_ids: list[str]  # sequences that hit a stop string: finish them in the core
    failed_ids: list[str]  # sequences whose output processing raised: fail them in the core


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, normalize_embeddings: bool = True):
        self.tokenizer = tokenizer
        self.normalize_embeddings = normalize_embeddings  # the model's pooler default
        self._states: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, tuple[_RequestState, _Sequence]] = {}
        self._pooling: dict[str, _PoolingRequest] = {}

    def add_pooling_request(self, request_id: str, prompt_token_ids: list[int], params: PoolingParams,
                            arrival_time: float) -> None:
        self._pooling[request_id] = _PoolingRequest(request_id, prompt_token_ids, params,
                                                    RequestMetrics(arrival_time=arrival_time,
                                                                   num_prompt_tokens=len(prompt_token_ids)))

    def _pooled_output(self, out: EngineCoreOutput, now: float) -> EmbeddingRequestOutput:
        state = self._pooling.pop(out.request_id)
        state.metrics.finished_time = now
        state.metrics.num_cached_tokens = out.num_cached_tokens
        embedding = None
        if out.pooled is not None:
            vector = np.frombuffer(out.pooled, dtype=np.float32)
            if state.params.dimensions is not None:
                vector = vector[:state.params.dimensions]
            normalize = state.params.normalize
            if normalize if normalize is not None else self.normalize_embeddings:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            embedding = EmbeddingOutput(vector.tolist())
        return EmbeddingRequestOutput(state.request_id, embedding, state.prompt_token_ids, True, state.metrics,
                                      error=out.error, exception=out.exception)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[str]:
        """Registers a user request; returns the ids of its sequences in the core."""
        sequences = []
        child_ids = []
        samples = params.num_samples
        for i in range(samples):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                           list(params.stop), params.include_stop_str_in_output)
            ranked = params.logprobs is not None or params.ranks_samples
            seq = _Sequence(i, detok, logprobs=[] if params.logprobs is not None else None,
                            cumulative_logprob=0.0 if ranked else None)
            sequences.append(seq)
            child_ids.append(child_request_id(request_id, i, samples))
        state = _RequestState(request_id, prompt, prompt_token_ids, params, sequences,
                              RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids)))
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = []
        self._states[request_id] = state
        for cid, seq in zip(child_ids, sequences):
            self._child_to_parent[cid] = (state, seq)
        return child_ids

    def has_request(self, request_id: str) -> bool:
        return request_id in self._states or request_id in self._pooling

    def child_ids(self, request_id: str) -> list[str]:
        if request_id in self._pooling:
            return [request_id]
        state = self._states.get(request_id)
        if state is None:
            return []
        return [child_request_id(request_id, s.index, len(state.sequences)) for s in state.sequences]

    @property
    def num_unfinished(self) -> int:
        return len(self._states) + len(self._pooling)

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Token outputs → RequestOutputs, plus the sequences the core must finish (stop strings, failures)."""
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        result = ProcessedOutputs([], [], [])
        for out in core_outputs:
            if out.request_id in self._pooling:
                if out.finished:
                    result.outputs.append(self._pooled_output(out, now))
                continue
            entry = self._child_to_parent.get(out.request_id)
            if entry is None:
                continue
            state, seq = entry
            if seq.finish_reason is not None:
                continue
            touched[state.request_id] = state
            try:
                self._process_one(state, seq, out, now, result.stopped_ids)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not touch the others
                state.error = f"{type(exc).__name__}: {exc}"
                for other in state.sequences:
                    if other.finish_reason is None:
                        other.finish_reason = "error"
                        cid = child_request_id(state.request_id, other.index, len(state.sequences))
                        self._child_to_parent.pop(cid, None)
                        result.failed_ids.append(cid)

        for state in touched.values():
            output = self._make_output(state)
            if output is not None:
                result.outputs.append(output)
            if state.finished:
                state.metrics.finished_time = now
                del self._states[state.request_id]
        return result

    def _process_one(self, state: _RequestState, seq: _Sequence, out: EngineCoreOutput, now: float,
                     stopped: list[str]) -> None:
        metrics = state.metrics
        if out.prompt_logprobs is not None and state.prompt_logprobs is not None and seq.index == 0:
            state.prompt_logprobs.extend(self._convert_logprobs(lp) if lp else None
                                         for lp in out.prompt_logprobs)
        if out.error is not None:
            state.error = out.error
            state.exception = out.exception
        metrics.spec_num_draft_tokens += out.num_draft_tokens
        metrics.spec_num_accepted_tokens += out.num_accepted_tokens
        for i, token in enumerate(out.new_token_ids):
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            metrics.num_cached_tokens = out.num_cached_tokens
            seq.token_ids.append(token)
            if out.logprobs is not None:
                if seq.logprobs is not None:
                    seq.logprobs.append(self._convert_logprobs(out.logprobs[i]))
                if seq.cumulative_logprob is not None:
                    seq.cumulative_logprob += out.logprobs[i].logprobs[0]
            stop = seq.detok.add_token(token)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                stopped.append(out.request_id)
                break
        if seq.finish_reason is None and out.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        if seq.finish_reason is not None:
            self._child_to_parent.pop(out.request_id, None)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """Finishes a user request from outside the core (abort, failure) → its final output."""
        if request_id in self._pooling:
            return self._pooled_output(EngineCoreOutput(request_id, [], finish_reason=reason, error=error),
                                       time.monotonic())
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        for seq in state.sequences:
            self._child_to_parent.pop(child_request_id(request_id, seq.index, len(state.sequences)), None)
            if seq.finish_reason is None:
                seq.finish_reason = reason
        state.error = error
        state.metrics.finished_time = time.monotonic()
        return self._make_output(state, force=True)

    def _convert_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        # Each token's own text (not its byte-level vocabulary spelling such as "Ġhello").
        decoded = self.tokenizer.batch_decode([[t] for t in lp.token_ids])
        return {tid: Logprob(val, rank, tok) for tid, val, rank, tok in zip(lp.token_ids, lp.logprobs, lp.ranks, decoded)}

    def _make_output(self, state: _RequestState, force: bool = False) -> RequestOutput | None:
        kind = state.params.output_kind
        finished = state.finished
        ranked = state.params.ranks_samples
        if (kind == RequestOutputKind.FINAL_ONLY or ranked) and not finished:
            return None  # best_of's choice exists only once every sample has ended
        delta = kind == RequestOutputKind.DELTA
        completions = []
        sequences = state.sequences
        if ranked:  # the n best samples by cumulative logprob, numbered 0..n-1
            best = sorted(sequences, key=lambda q: -(q.cumulative_logprob or 0.0))[:state.params.n]
            sequences = [dataclasses.replace(q, index=i) for i, q in enumerate(best)]
        for seq in sequences:
            done = seq.finish_reason is not None
            text_end = seq.detok.emittable_length(done)
            if delta:
                if not force and text_end == seq.sent_text and len(seq.token_ids) == seq.sent_tokens and not done:
                    continue
                text = seq.detok.text[seq.sent_text:text_end]
                tokens = seq.token_ids[seq.sent_tokens:]
                logprobs = seq.logprobs[seq.sent_tokens:] if seq.logprobs is not None else None
            else:
                text = seq.detok.text[:text_end]
                tokens = list(seq.token_ids)
                logprobs = list(seq.logprobs) if seq.logprobs is not None else None
            seq.sent_text, seq.sent_tokens = text_end, len(seq.token_ids)
            completions.append(CompletionOutput(seq.index, text, tokens, seq.cumulative_logprob, logprobs,
                                                seq.finish_reason, seq.stop_reason))
        if delta and not completions and not finished:
            return None
        prompt_logprobs = None
        if state.prompt_logprobs is not None and (not delta or not state.sent_prompt_logprobs):
            prompt_logprobs = list(state.prompt_logprobs)
            state.sent_prompt_logprobs = True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished,
                             metrics=state.metrics, prompt_logprobs=prompt_logprobs,
                             num_cached_tokens=state.metrics.num_cached_tokens, error=state.error,
                             exception=state.exception)
