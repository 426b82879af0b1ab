"""EngineCore: the synchronous step loop (no asyncio): schedule → execute → update.

It owns the model runner, the KV cache manager and the scheduler. One step returns the
token-level outputs of that step; text, stop strings and n > 1 aggregation happen in the
OutputProcessor above it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from asyncllm.config import EngineConfig
from asyncllm.core.kv_cache_manager import KVCacheManager
from asyncllm.core.sched_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from asyncllm.core.scheduler import Scheduler, SchedulerConfig
from asyncllm.errors import PromptTooLongError
from asyncllm.model.dtype import resolve_dtype
from asyncllm.model.layers.block_quant import QUANTIZATION_BITS
from asyncllm.model.layers.int4 import int4_max_rows
from asyncllm.model.layers.linear import prepack_supported
from asyncllm.model.loader import Checkpoint, load_checkpoint
from asyncllm.model.registry import build_model
from asyncllm.request import Request, RequestStatus
from asyncllm.worker.cpu_allocator import keep_freed_memory_in_heap, return_freed_memory
from asyncllm.worker.model_runner import KVCacheSpec, ModelRunner

logger = logging.getLogger(__name__)


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


@dataclass
class LoadReport:
    seconds: float
    dtype: torch.dtype
    num_blocks: int
    max_model_len: int


class EngineCore:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None):
        started = time.perf_counter()
        args = config.args
        self.config = config
        self.checkpoint = checkpoint or load_checkpoint(args.model, args.tokenizer)
        model_cfg = self.checkpoint.config
        # Keeping only quantised blocks computes every step in fp32 (the block kernels and the
        # panel GEMM), so "auto" means fp32 there rather than a dtype that setting refuses.
        self.dtype = (torch.float32 if args.quantized_weights_only and config.dtype_request == "auto"
                      else resolve_dtype(config.dtype_request, config.device))
        model = build_model(model_cfg, self.dtype, config.device, config.kernels)
        model.load_weights(self.checkpoint.weights(self.dtype))
        if args.cpu_weight_prepack and prepack_supported(config.device, self.dtype):
            model.prepack_weights()
        if args.quantization is not None:
            self._quantize(model, args.quantization)
        model.eval()
        if args.cpu_malloc_tuning and config.device.type == "cpu":
            # After the load, so its temporary buffers have gone back to the OS.
            keep_freed_memory_in_heap()

        spec = KVCacheSpec(model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, args.block_size,
                           self.dtype)
        num_blocks = self._num_blocks(spec)
        capacity = num_blocks * args.block_size
        max_model_len = min(args.max_model_len or model_cfg.max_position_embeddings, capacity)
        if args.max_model_len is not None and args.max_model_len > model_cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {args.max_model_len} exceeds the model's "
                             f"{model_cfg.max_position_embeddings} positions")
        if args.max_model_len is not None and args.max_model_len > capacity:
            logger.warning("max_model_len %d exceeds the KV cache (%d tokens); using %d",
                           args.max_model_len, capacity, capacity)
        self.max_model_len = max_model_len
        self.runner = ModelRunner(model, model_cfg, spec, num_blocks, config.device, args.seed,
                                  prefault=args.kv_cache_prefault)
        self.kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_model_len, args.enable_chunked_prefill),
            self.kv)
        self.num_steps = 0
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0
        self.load_report = LoadReport(time.perf_counter() - started, self.dtype, num_blocks, max_model_len)
        logger.info("EngineCore ready in %.2fs: %s, dtype %s, %d KV blocks, max_model_len %d",
                    self.load_report.seconds, self.checkpoint.name, self.dtype, num_blocks, max_model_len)

    def _quantize(self, model, scheme: str) -> None:
        if self.config.args.quantized_weights_only and self.dtype != torch.float32:
            raise ValueError(f"quantized_weights_only needs dtype float32 (the blocks' large-step path is fp32); "
                             f"got {self.dtype} (dtype={self.config.args.dtype!r}): pass dtype='float32'")
        bits = QUANTIZATION_BITS[scheme]
        done, skipped = model.quantize(bits, int4_rows=int4_max_rows(self.dtype))
        quantized = [p for p in model.projections() if p.quantized is not None]
        rows = max((p.quantized_max_rows for p in quantized), default=0)
        copies = [p.quantized for p in quantized] + ([model.logits_quant] if model.logits_quant is not None else [])
        # Exact copies (a GGUF quantised in these formats) make the quantised steps compute with
        # the weights themselves: the same outputs as the dense path.
        logger.info("%s: %d projections have %d-bit copies for steps of <= %d rows (%d left dense: shape)%s; "
                    "%d of %d copies hold their weights exactly; the copies take %.0f MB",
                    scheme, done, bits, rows, skipped,
                    "; the logits weight an 8-bit copy" if model.logits_quant is not None else "",
                    sum(c.exact for c in copies), len(copies), sum(c.nbytes for c in copies) / 1e6)
        if self.config.args.quantized_weights_only:
            freed = model.drop_dense_projections()
            if self.config.device.type == "cpu":
                return_freed_memory()
            logger.info("%s: kept only the quantised projections, freeing %.0f MB of dense weights and packed copies",
                        scheme, freed / 1e6)

    def _num_blocks(self, spec: KVCacheSpec) -> int:
        if self.config.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.config.device)
            used = total - free
            budget = int(total * self.config.args.gpu_memory_utilization) - used
            if budget <= 0:
                raise ValueError("no GPU memory left for the KV cache; raise gpu_memory_utilization")
            return max(1, spec.num_blocks_for(budget))
        memory = self.config.kv_cache_memory
        blocks = spec.num_blocks_for(memory)
        if blocks < 1:
            raise ValueError(f"kv_cache_memory={memory} bytes holds no block ({spec.bytes_per_block} bytes each)")
        return blocks

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
        grammar_errors = self._check_grammars()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if not grammar_errors:
                self._wait_for_grammars()
            return grammar_errors
        try:
            result = self.runner.execute(sched)
            failed: dict[str, BaseException] = {}
        except Exception:  # noqa: BLE001 - isolated below, request by request
            result, failed = self._execute_isolated(sched)
        errors = [self._fail(request_id, exc) for request_id, exc in failed.items()]
        outputs = self.scheduler.update_from_output(sched, result) + errors + grammar_errors
        self.num_steps += 1
        self.generation_tokens += len(result.sampled)
        self.prompt_tokens_computed += sum(
            max(0, min(s.start + s.num_new_tokens, s.request.num_prompt_tokens) - s.start) for s in sched.scheduled)
        return outputs

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

    def _execute_isolated(self, sched: SchedulerOutput) -> tuple[ModelRunnerOutput, dict[str, BaseException]]:
        """A batch failed: run each request alone so only the faulty ones fail.

        Re-running is safe: a step writes each token's K/V to the same slot with the same
        values, and the cache pages of one request are never read by another's failure.
        """
        merged = ModelRunnerOutput(sampled={})
        failed: dict[str, BaseException] = {}
        for item in sched.scheduled:
            single = SchedulerOutput([item], item.num_new_tokens)
            try:
                part = self.runner.execute(single)
            except Exception as exc:  # noqa: BLE001 - this request is the faulty one
                failed[item.request.request_id] = exc
                continue
            merged.sampled.update(part.sampled)
            merged.logprobs.update(part.logprobs)
            merged.prompt_logprobs.update(part.prompt_logprobs)
        return merged, failed

    def stats(self) -> EngineStats:
        st = self.kv.stats
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.kv.usage,
                           self.kv.pool.num_blocks, self.kv.num_used_blocks(), st.queries, st.hits, st.hit_rate,
                           self.scheduler.num_preemptions, self.prompt_tokens_computed, self.generation_tokens,
                           self.num_steps)

    def shutdown(self) -> None:
        self.runner.release()
