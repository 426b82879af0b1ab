"""EngineCore: the synchronous step loop (no asyncio): schedule → execute → update.

It creates the executor first (which loads the model on its workers and reports how many
KV blocks fit), sizes the KV cache, then builds the scheduler, as vLLM V1 does. A step sends
the executor plain data (the scheduler's output plus the grammar bitmask computed here)
and gets the sampled tokens back; text, stop strings and n > 1 aggregation happen in the
OutputProcessor above it.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import torch

from asyncllm.config import EngineConfig
from asyncllm.core.kv_cache_manager import KVCacheManager
from asyncllm.core.sched_output import EngineCoreOutput, GrammarOutput, SchedulerOutput
from asyncllm.core.scheduler import Proposer, Scheduler, SchedulerConfig
from asyncllm.errors import PromptTooLongError
from asyncllm.executor import Executor, create_executor
from asyncllm.executor.abstract import PendingStep
from asyncllm.model.loader import Checkpoint, load_checkpoint
from asyncllm.pooling.config import resolve_pooler
from asyncllm.request import Request, RequestStatus
from asyncllm.sampling.structured import write_bitmask
from asyncllm.spec_decode import make_proposer
from asyncllm.worker.worker import CacheConfig

logger = logging.getLogger(__name__)


def task_of(requested: str, model_cfg) -> str:
    """generate or embed: an encoder only embeds; a decoder generates unless told to embed."""
    if model_cfg.is_encoder_only:
        if requested == "generate":
            raise ValueError(f"{model_cfg.architecture} is an encoder: it serves embeddings (task='embed'), "
                             "not generation")
        return "embed"
    return "embed" if requested == "embed" else "generate"


class WorkerRequestError(RuntimeError):
    """A request failed inside a worker (the message is the worker's error)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks: int
    num_used_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_computed: int
    generation_tokens: int
    num_steps: int
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


@dataclass
class LoadReport:
    seconds: float
    dtype: torch.dtype
    num_blocks: int
    max_model_len: int


class EngineCore:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None,
                 proposer: Proposer | None = None, num_speculative_tokens: int = 0):
        """`proposer` / `num_speculative_tokens` default to what `speculative_config` asks for."""
        started = time.perf_counter()
        if proposer is None and config.speculative is not None:
            proposer = make_proposer(config.speculative)
            num_speculative_tokens = config.speculative.num_speculative_tokens
        args = config.args
        self.config = config
        # The config and tokenizer (the weights stream is read by the workers).
        self.checkpoint = checkpoint or load_checkpoint(args.model, args.tokenizer)
        model_cfg = self.checkpoint.config
        self.task = task_of(args.task, model_cfg)
        self.pooler_config = resolve_pooler(args.pooler_config, self.checkpoint.sentence_transformers,
                                            model_cfg.is_encoder_only)
        self.executor: Executor = create_executor(config, self.checkpoint)
        try:
            info = self.executor.initialize()
            self.dtype = info.torch_dtype
            num_blocks = info.num_blocks
            capacity = num_blocks * args.block_size
            longest = model_cfg.max_position_embeddings
            layout = self.checkpoint.sentence_transformers
            if args.max_model_len is None and layout is not None and layout.max_seq_length:
                longest = min(longest, layout.max_seq_length)  # what the embedding model was trained on
            max_model_len = min(args.max_model_len or longest, capacity)
            if model_cfg.is_encoder_only and args.max_num_batched_tokens < max_model_len:
                raise ValueError(f"an encoder runs each prompt in one step: max_num_batched_tokens "
                                 f"({args.max_num_batched_tokens}) must be >= max_model_len ({max_model_len})")
            if args.max_model_len is not None and args.max_model_len > model_cfg.max_position_embeddings:
                longrope = getattr(getattr(model_cfg, "rope", None), "rope_type", None) == "longrope"
                raise ValueError(f"max_model_len {args.max_model_len} exceeds the model's "
                                 f"{model_cfg.max_position_embeddings} positions" + (
                                     " (a LongRoPE model without long factors runs within its original "
                                     "context)" if longrope else ""))
            if args.max_model_len is not None and args.max_model_len > capacity:
                logger.warning("max_model_len %d exceeds the KV cache (%d tokens); using %d",
                               args.max_model_len, capacity, capacity)
            self.executor.init_cache(CacheConfig(num_blocks, max_model_len))
        except BaseException:
            self.executor.shutdown()
            raise
        self.max_model_len = max_model_len
        self.vocab_size = model_cfg.vocab_size
        # An encoder sees each whole prompt in one step and keeps no K/V to share.
        encoder = model_cfg.is_encoder_only
        self.kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching and not encoder)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_model_len,
                            args.enable_chunked_prefill and not encoder, num_speculative_tokens,
                            config.speculative.disable_by_batch_size if config.speculative is not None else None,
                            config.speculative.disable_by_acceptance_rate if config.speculative is not None else None,
                            pooling_uses_cache=not self.pooler_config.needs_every_position,
                            max_loras=args.max_loras if args.enable_lora else 0,
                            max_in_flight=args.pipeline_parallel_size,
                            draft_in_worker=config.speculative is not None
                            and config.speculative.method == "draft_model",
                            vocab_size=model_cfg.vocab_size,
                            long_rope_from=getattr(getattr(model_cfg, "rope", None), "long_rope_from", None)),
            self.kv, proposer)
        # Pipeline parallel: up to one batch per stage in flight, so the stages overlap.
        self.max_in_flight = args.pipeline_parallel_size
        self._in_flight: collections.deque[tuple[SchedulerOutput, int, PendingStep]] = collections.deque()
        self.num_steps = 0
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0
        self.num_drafts = 0  # (request, step) pairs that verified proposed tokens
        self.num_draft_tokens = 0  # proposed tokens verified
        self.num_accepted_tokens = 0  # of those, kept
        self.load_report = LoadReport(time.perf_counter() - started, self.dtype, num_blocks, max_model_len)
        logger.info("EngineCore ready in %.2fs: %s, dtype %s, %d KV blocks, max_model_len %d",
                    self.load_report.seconds, self.checkpoint.name, self.dtype, num_blocks, max_model_len)

    # ------------------------------------------------------------------ requests

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        """A prompt (plus one output token) larger than the whole KV cache could never run."""
        blocks = self.kv.blocks_needed(num_prompt_tokens + 1)
        if blocks > self.kv.pool.num_blocks:
            raise PromptTooLongError(f"the prompt needs {blocks} KV blocks but the whole cache has "
                                     f"{self.kv.pool.num_blocks}", param="prompt")

    def add_request(self, request: Request) -> None:
        self.check_prompt_fits(request.num_prompt_tokens)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ step

    def step(self) -> list[EngineCoreOutput]:
        """Schedules and runs a batch; with several in flight (pipeline parallel), fills the queue
        with batches of requests that are not in flight, then finishes the oldest."""
        grammar_errors = self._check_grammars()
        while len(self._in_flight) < self.max_in_flight:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                break
            sched.grammar = self._grammar_bitmask(sched)
            self._in_flight.append((sched, self._prompt_tokens(sched), self.executor.execute_async(sched)))
        if not self._in_flight:
            if not grammar_errors:
                self._wait_for_grammars()
            return grammar_errors
        sched, prompt_tokens, pending = self._in_flight.popleft()
        result = pending.result()
        errors = [self._fail(request_id, WorkerRequestError(message)) for request_id, message in result.failed.items()]
        outputs = self.scheduler.update_from_output(sched, result) + errors + grammar_errors
        self.num_steps += 1
        self.generation_tokens += sum(len(tokens) for tokens in result.sampled_token_ids)
        self.prompt_tokens_computed += prompt_tokens
        self.num_drafts += sum(1 for s in sched.scheduled if s.spec_token_ids)
        self.num_draft_tokens += sum(len(s.spec_token_ids) for s in sched.scheduled)
        self.num_accepted_tokens += sum(len(tokens) - 1 for tokens in result.sampled_token_ids)
        return outputs

    def _prompt_tokens(self, sched: SchedulerOutput) -> int:
        requests = self.scheduler.requests
        return sum(max(0, min(s.start + s.num_new_tokens, requests[s.req_id].num_prompt_tokens) - s.start)
                   for s in sched.scheduled)

    def _grammar_bitmask(self, sched: SchedulerOutput) -> GrammarOutput | None:
        """Each constrained request that samples this step: its automaton's allowed next tokens, and
        after each of its proposals (the masks the scheduler kept while checking them)."""
        requests = self.scheduler.requests
        items = [s for s in sched.scheduled
                 if s.samples and requests[s.req_id].grammar is not None and requests[s.req_id].grammar.guide is not None]
        if not items:
            return None
        parts = []
        for item in items:
            grammar = requests[item.req_id].grammar
            if item.spec_token_ids and grammar.spec_masks is not None:
                parts.append(grammar.spec_masks[:len(item.spec_token_ids) + 1])
            else:
                parts.append(write_bitmask([grammar.guide], self.vocab_size))
        bitmask = torch.cat(parts)
        return GrammarOutput([s.req_id for s in items], bitmask.numpy().tobytes(), bitmask.shape[1],
                             [part.shape[0] for part in parts])

    def _check_grammars(self) -> list[EngineCoreOutput]:
        """Waiting requests whose grammar failed to compile (or took too long) fail now."""
        failed = []
        for _, request in list(self.scheduler.waiting):
            if request.grammar is None or request.grammar.guide is not None:
                continue
            try:
                request.grammar.ready()
            except Exception as exc:  # noqa: BLE001 - this request's grammar only
                failed.append(self._fail(request.request_id, exc))
        return failed

    def _fail(self, request_id: str, exc: BaseException) -> EngineCoreOutput:
        """Ends one request with an error (its blocks are freed) → the output that tells its caller."""
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ERROR)
        logger.warning("request %s failed: %r", request_id, exc)
        return EngineCoreOutput(request_id, [], finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                                exception=exc)

    def _wait_for_grammars(self, timeout: float = 0.05) -> None:
        """Nothing to run but grammars compiling: sleep on them instead of spinning."""
        import concurrent.futures

        pending = [r.grammar.future for _, r in self.scheduler.waiting
                   if r.grammar is not None and r.grammar.guide is None]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def stats(self) -> EngineStats:
        st = self.kv.stats
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.kv.usage,
                           self.kv.pool.num_blocks, self.kv.num_used_blocks(), st.queries, st.hits, st.hit_rate,
                           self.scheduler.num_preemptions, self.prompt_tokens_computed, self.generation_tokens,
                           self.num_steps, self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)

    def shutdown(self) -> None:
        self.executor.shutdown()
