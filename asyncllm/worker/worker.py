"""Worker: one rank's model. It loads and quantises the weights, reports how many KV blocks
fit, then owns the KV cache and the ModelRunner that executes each step.

The same class runs in the engine thread (uni executor) and in a worker process (mp): it
takes the engine config and plain step data, and returns plain results.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from asyncllm.config import EngineConfig, parse_cuda_graph_sizes
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.lora.manager import LoRAManager
from asyncllm.model.checkpoint_quant import SUPPORTED_METHODS
from asyncllm.model.dtype import resolve_dtype
from asyncllm.model.interface import ModelContext
from asyncllm.model.layers.block_quant import QUANTIZATION_BITS
from asyncllm.model.layers.int4 import int4_max_rows
from asyncllm.model.layers.linear import prepack_supported
from asyncllm.model.layers.ops import Ops
from asyncllm.model.loader import Checkpoint, load_checkpoint
from asyncllm.model.layers.attention import FP8_KV_DTYPE
from asyncllm.model.parallel import SINGLE_STAGE, ParallelContext, PipelineContext
from asyncllm.model.registry import build_model
from asyncllm.pooling.config import resolve_pooler
from asyncllm.pooling.pooler import Pooler
from asyncllm.worker import auto_setting
from asyncllm.worker.auto_setting import CpuSetting
from asyncllm.worker.cpu_allocator import keep_freed_memory_in_heap, return_freed_memory
from asyncllm.worker.cuda_graphs import graph_unsupported_reason
from asyncllm.worker.memory_profile import activation_peak_bytes, dummy_step_shape, kv_cache_budget
from asyncllm.worker.model_runner import KVCacheSpec, ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    """What a loaded worker reports: the KV blocks its memory holds, and its dtype."""

    num_blocks: int
    dtype: str  # torch dtype name, e.g. "float32"
    load_seconds: float

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class CacheConfig:
    """What the engine decided from the workers' reports."""

    num_blocks: int
    max_model_len: int


class Worker:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None, rank: int = 0,
                 world_size: int = 1, shm=None, tp_group=None):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.shm = shm  # the host's shared-memory collectives (tensor parallel on the CPU)
        self.tp_group = tp_group  # torch.distributed's group of this stage's ranks (None: all ranks)
        self._checkpoint = checkpoint
        self.model: torch.nn.Module | None = None
        self.runner: ModelRunner | None = None
        self.spec: KVCacheSpec | None = None
        self.pooler: Pooler | None = None
        self.lora: LoRAManager | None = None
        self.draft_model: torch.nn.Module | None = None  # speculative_config's draft_model
        self.draft_spec: KVCacheSpec | None = None

    def load_model(self) -> WorkerInfo:
        started = time.perf_counter()
        config, args = self.config, self.config.args
        checkpoint = self._checkpoint or load_checkpoint(args.model, args.tokenizer)
        model_cfg = checkpoint.config
        check_checkpoint_quantization(args.quantization, checkpoint)
        setting = self._setting(checkpoint)
        dtype = setting.dtype
        # dtype auto may pick the GGUF's exact blocks alone (auto_setting.py): as if quantization
        # int4 / int8 with quantized_weights_only had been asked for.
        quantization = args.quantization or setting.quantization
        weights_only = args.quantized_weights_only or setting.block_bits is not None
        # quantization int4 / int8 of a GGUF: projections stored in a type those blocks hold exactly
        # keep the file's codes (gguf_blocks.py) instead of a re-quantisation of their values.
        exact_bits = QUANTIZATION_BITS.get(quantization) if checkpoint.format == "gguf" else None
        model = self._build(checkpoint, dtype,
                            ModelContext(Ops(config.kernels), self.tensor_parallel, self._pipeline(model_cfg),
                                         blocks_only=weights_only),
                            exact_bits=exact_bits if exact_bits in (4, 8) else None)
        if quantization in QUANTIZATION_BITS and checkpoint.quantization is None:
            if model_cfg.is_encoder_only:
                raise ValueError(f"quantization is not supported for encoder models ({model_cfg.architecture})")
            self._quantize(model, quantization, dtype, weights_only)
        self._prepack(model, dtype)
        model.eval()
        if args.enable_lora:
            if model_cfg.is_encoder_only:
                raise ValueError(f"LoRA adapters are not supported for encoder models ({model_cfg.architecture})")
            if getattr(model_cfg, "moe", None) is not None:
                raise ValueError(f"LoRA adapters are not supported for mixture-of-experts models "
                                 f"({model_cfg.architecture})")
            self.lora = LoRAManager(model, args.max_loras, args.max_lora_rank, args.max_cpu_loras or args.max_loras,
                                    config.device, dtype)
        if config.device.type == "cpu":
            # The load's temporaries (a GGUF tokenizer's conversion: ~320 MB for Gemma 3's 262k
            # vocabulary; dense copies of weights kept as blocks) back to the OS: malloc keeps
            # freed memory below its heap top otherwise.
            return_freed_memory()
            if args.cpu_malloc_tuning:  # after that, so the load's buffers are not kept
                keep_freed_memory_in_heap()
        self.model = model
        self.pooler = Pooler(resolve_pooler(args.pooler_config, checkpoint.sentence_transformers,
                                            model_cfg.is_encoder_only).pooling_type)
        self._checkpoint = None  # the weights stream is spent; the engine keeps its own checkpoint
        # An encoder keeps no K/V: its blocks only count tokens for the scheduler.
        pipeline = model.ctx.pipeline if hasattr(model, "ctx") else SINGLE_STAGE
        layers = 0 if model_cfg.is_encoder_only else (
            model_cfg.num_layers if pipeline.is_single else pipeline.end_layer - pipeline.first_layer)
        kv_heads = self.tensor_parallel.local_kv_heads(model_cfg.num_kv_heads)
        kv_dtype = FP8_KV_DTYPE if args.kv_cache_dtype in ("fp8", "fp8_e4m3") else dtype
        self.spec = KVCacheSpec(layers, kv_heads, model_cfg.head_dim, args.block_size, kv_dtype)
        specs = [self.spec]
        speculative = config.speculative
        if speculative is not None and speculative.method == "draft_model":
            self.draft_model, self.draft_spec = self._load_draft(speculative, checkpoint, dtype, kv_dtype)
            specs.append(self.draft_spec)  # a block holds the draft's K/V of its tokens too
        return WorkerInfo(self._num_blocks(specs, model_cfg.max_position_embeddings),
                          str(dtype).removeprefix("torch."), time.perf_counter() - started)

    def _build(self, checkpoint: Checkpoint, dtype: torch.dtype, ctx: ModelContext,
               exact_bits: int | None = None) -> torch.nn.Module:
        """The checkpoint's model with its weights loaded, not yet packed (_prepack, after any
        quantisation); `exact_bits`: a GGUF's projections that blocks of these bits hold exactly take
        the file's codes."""
        if checkpoint.quantization is not None:  # runs from its codes: no dense copy where they serve
            ctx = dataclasses.replace(ctx, blocks_only=True)
        model = build_model(checkpoint.config, dtype, self.config.device, ctx)
        model.load_weights(checkpoint.weights(dtype, exact_bits=exact_bits))
        if exact_bits is not None:
            blocks, dense = model.checkpoint_block_counts()
            logger.info("GGUF: %d projections keep the file's codes as %d-bit blocks (exact%s), %d are quantised from "
                        "their values", blocks, exact_bits, ", no dense copy" if ctx.blocks_only else "", dense)
        if checkpoint.quantization is not None:
            blocks, dense = model.checkpoint_block_counts()
            logger.info("%s checkpoint: %d projections run from its %d-bit codes (no dense copy), %d dense "
                        "(dequantised: act order, other group sizes, or no C kernel for this dtype)",
                        checkpoint.quantization.method, blocks, checkpoint.quantization.bits, dense)
        return model

    def _prepack(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """The packed copies the steps read (cpu_weight_prepack), made after quantisation so that
        weights kept only as blocks are never packed (the load's peak stays near the blocks')."""
        if self.config.args.cpu_weight_prepack and prepack_supported(self.config.device, dtype,
                                                                     Ops(self.config.kernels)):
            model.prepack_weights()

    def _load_draft(self, speculative, target: Checkpoint, dtype: torch.dtype,
                    kv_dtype: torch.dtype) -> tuple[torch.nn.Module, KVCacheSpec]:
        """The draft model of speculative_config (same dtype and kernels as the target, its own
        quantization), and the K/V it keeps per block."""
        args = self.config.args
        draft = load_checkpoint(speculative.model, None)
        cfg = draft.config
        if cfg.is_encoder_only or cfg.vocab_size != target.config.vocab_size or (
                draft.tokenizer is not None and target.tokenizer is not None
                and draft.tokenizer.get_vocab() != target.tokenizer.get_vocab()):
            raise ValueError(f"the draft model {speculative.model!r} must be a decoder with the target's tokenizer "
                             f"(vocabulary of {target.config.vocab_size}); it has {cfg.vocab_size} tokens"
                             + ("" if cfg.vocab_size != target.config.vocab_size else " and another vocabulary"))
        model = self._build(draft, dtype, ModelContext(Ops(self.config.kernels)))
        if speculative.quantization is not None:
            model.quantize(QUANTIZATION_BITS[speculative.quantization], int4_rows=int4_max_rows(dtype))
        self._prepack(model, dtype)
        model.eval()
        return model, KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, args.block_size, kv_dtype)

    @property
    def tensor_parallel(self) -> ParallelContext:
        """This rank's place in its tensor-parallel group (ranks are stage-major: rank = stage * tp + i)."""
        tp = self.world_size // self.config.args.pipeline_parallel_size
        return ParallelContext(self.rank % tp, tp, self.shm if tp > 1 else None, self.tp_group)

    def _pipeline(self, model_cfg) -> PipelineContext:
        stages = self.config.args.pipeline_parallel_size
        if stages == 1:
            return SINGLE_STAGE
        tp = self.world_size // stages
        return PipelineContext.of(self.rank // tp, stages, model_cfg.num_layers, self.rank, tp)

    def init_cache(self, cache: CacheConfig) -> None:
        args = self.config.args
        self.runner = ModelRunner(self.model, self.spec, cache.num_blocks, cache.max_model_len, args.max_num_seqs,
                                  self.config.device, args.seed, prefault=args.kv_cache_prefault, pooler=self.pooler,
                                  lora=self.lora, draft=(self.draft_model, self.draft_spec) if self.draft_model else None)
        if self.config.device.type == "cuda" and not args.enforce_eager:
            reason = graph_unsupported_reason(self.model, self.config.kernels, lora=self.lora is not None,
                                              draft=self.draft_model is not None)
            if reason is None:
                self.runner.enable_decode_graphs(parse_cuda_graph_sizes(args.cuda_graph_sizes, args.max_num_seqs),
                                                 capture=True)
            else:
                logger.info("CUDA graphs off: %s; steps run eagerly", reason)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.release()
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()  # the cache's memory back to the device, for the next engine to size its own

    def _setting(self, checkpoint: Checkpoint) -> CpuSetting:
        """The dtype (and, under auto, whether to keep only a GGUF's exact blocks) this worker runs."""
        config, args = self.config, self.config.args
        model_cfg = checkpoint.config
        if config.dtype_request != "auto":
            return CpuSetting(resolve_dtype(config.dtype_request, config.device))
        # Keeping only quantised blocks computes every step in fp32 (the block kernels and the
        # panel GEMM), so "auto" means fp32 there rather than a dtype that setting refuses; so
        # for a quantised checkpoint (GPTQ / AWQ / compressed-tensors / FP8) on the C kernels, which
        # runs from its blocks.
        if args.quantized_weights_only or (checkpoint.quantization is not None and config.kernels == "cpu"):
            return CpuSetting(torch.float32)
        # Whole steps are timed for one plain decoder on the C kernels in one process (ranks
        # timing apart could pick different dtypes); the rest keep the one-matmul rule.
        if (config.device.type != "cpu" or config.kernels != "cpu" or self.world_size > 1 or args.quantization
                or model_cfg.is_encoder_only or model_cfg.moe is not None or model_cfg.vision is not None):
            return CpuSetting(resolve_dtype("auto", config.device))
        # The file's own blocks alone: not with adapters or a draft model, which need dense weights.
        draft = config.speculative is not None and config.speculative.method == "draft_model"
        block_bits = None if args.enable_lora or draft else checkpoint.exact_block_bits
        setting, _ = auto_setting.choose(model_cfg, auto_setting.candidates(block_bits), config.kernels,
                                         args.cpu_weight_prepack)
        return setting

    def _quantize(self, model, scheme: str, dtype: torch.dtype, weights_only: bool) -> None:
        args = self.config.args
        if weights_only and dtype != torch.float32 and self.config.kernels == "cpu":
            raise ValueError(f"quantized_weights_only needs dtype float32 (the blocks' large-step path is fp32); "
                             f"got {dtype} (dtype={args.dtype!r}): pass dtype='float32'")
        bits = QUANTIZATION_BITS[scheme]
        done, skipped = model.quantize(bits, int4_rows=int4_max_rows(dtype))
        quantized = [p for p in model.projections() if p.quantized is not None]
        rows = max((p.quantized_max_rows for p in quantized), default=0)
        copies = [p.quantized for p in quantized] + ([model.logits_quant] if model.logits_quant is not None else [])
        # Exact copies (a GGUF quantised in these formats) make the quantised steps compute with
        # the weights themselves: the same outputs as the dense path.
        logger.info("%s: %d projections have %s copies for steps of <= %d rows (%d left dense: shape)%s; "
                    "%d of %d copies hold their weights exactly; the copies take %.0f MB",
                    scheme, done, "e4m3" if scheme == "fp8" else f"{bits}-bit", rows, skipped,
                    "; the logits weight an 8-bit copy" if model.logits_quant is not None else "",
                    sum(c.exact for c in copies), len(copies), sum(c.nbytes for c in copies) / 1e6)
        if weights_only:
            freed = model.drop_dense_projections()
            logger.info("%s: kept only the quantised projections, freeing %.0f MB of dense weights and packed copies",
                        scheme, freed / 1e6)

    def _num_blocks(self, specs: list[KVCacheSpec], max_positions: int) -> int:
        """Blocks that fit, each holding every spec's K/V of its tokens (the target's, a draft's)."""
        spec = specs[0]
        bytes_per_block = sum(s.bytes_per_block for s in specs)
        if bytes_per_block == 0:  # an encoder: room for max_num_seqs whole sequences, costing nothing
            return self.config.args.max_num_seqs * -(-max_positions // spec.block_size)
        if self.config.device.type == "cuda" and self.config.kv_cache_memory is None:
            args, device = self.config.args, self.config.device
            longest = min(max_positions, args.max_model_len or max_positions)
            shape = dummy_step_shape(args.max_num_batched_tokens, longest, spec.block_size)
            peak = activation_peak_bytes(self.model, spec, shape, args.max_num_seqs, device)
            free, total = torch.cuda.mem_get_info(device)
            budget = kv_cache_budget(total, free, args.gpu_memory_utilization, peak)
            logger.info("GPU memory: %.1f GiB in use after loading, a %d-token step peaks at %.2f GiB more; "
                        "%.1f GiB of gpu_memory_utilization %.2f left for the KV cache", (total - free) / 2**30,
                        shape.tokens, peak / 2**30, budget / 2**30, args.gpu_memory_utilization)
            return max(1, budget // bytes_per_block)
        memory = self.config.kv_cache_memory
        blocks = memory // bytes_per_block
        if blocks < 1:
            raise ValueError(f"kv_cache_memory={memory} bytes holds no block ({bytes_per_block} bytes each)")
        return blocks


def check_checkpoint_quantization(requested: str | None, checkpoint: Checkpoint) -> None:
    """EngineArgs.quantization against a checkpoint's own: unset or the same method for a GPTQ,
    AWQ or compressed-tensors folder (vLLM's rule); int4 / int8 quantise dense weights only."""
    method = None if checkpoint.quantization is None else checkpoint.quantization.method
    if method is None and requested in SUPPORTED_METHODS and requested not in QUANTIZATION_BITS:
        raise ValueError(f"quantization={requested!r} needs a {requested} checkpoint (an HF folder whose "
                         f"config.json has quantization_config); {checkpoint.name!r} has none")
    if method is not None and requested not in (None, method):
        raise ValueError(f"{checkpoint.name!r} is a {method} checkpoint: leave quantization unset or pass "
                         f"{method!r}, not {requested!r}")
