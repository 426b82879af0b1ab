"""EngineArgs (the one definition of every engine option) and the resolved configs.

The CLI builds its flags from the fields of EngineArgs, so an option added here is
an option of `asyncllm serve` too. `help` metadata becomes the flag's help text.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from asyncllm.model.layers.int4 import int4_supported
from asyncllm.multimodal.processor import parse_limit_mm_per_prompt
from asyncllm.pooling.config import parse_pooler_config
from asyncllm.sampling.structured import StructuredLimits
from asyncllm.sampling_params import SamplingLimits
from asyncllm.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineArgs:
    model: str | None = _opt(None, "HF-format folder (config.json + *.safetensors) or a .gguf file; "
                                   "default: the embedded SmolLM2-135M-Instruct")
    tokenizer: str | None = _opt(None, "tokenizer folder, when not the model's own")
    task: str = _opt("auto", "what the model serves: generate, embed (embeddings only: generation requests are "
                             "refused), or auto (embed for encoders such as BertModel, else generate; a "
                             "generating decoder serves embeddings too)",
                     choices=["auto", "generate", "embed"])
    pooler_config: dict | str | None = _opt(
        None, "how embeddings are pooled, as vLLM's: a dict or its JSON text, e.g. {\"pooling_type\": \"MEAN\", "
              "\"normalize\": true}; pooling_type LAST, MEAN or CLS (default: a sentence-transformers folder's, "
              "else LAST for decoders and CLS for encoders; normalized)")
    dtype: str = _opt("auto", "weights and activations dtype: auto, float32, bfloat16, float16",
                      choices=["auto", "float32", "bfloat16", "float16"])
    device: str = _opt("auto", "auto, cpu or cuda")
    kernels: str = _opt("auto", "attention/norm/rotary kernels: auto (Triton on CUDA when installed; on the "
                                "CPU the C kernels, built with gcc at first use, when they build), torch, "
                                "triton, or cpu",
                        choices=["auto", "torch", "triton", "cpu"])
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's, capped by the KV cache)")
    block_size: int = _opt(16, "tokens per KV cache block")
    kv_cache_memory: int | None = _opt(None, "bytes of KV cache (CPU default 1 GiB; on CUDA, when set, it replaces the "
                                             "gpu_memory_utilization sizing, as vLLM's kv_cache_memory_bytes)")
    kv_cache_prefault: bool = _opt(False, "CPU: map every page of the KV cache at start (as vLLM does) instead of "
                                          "on first use, which on a VM costs a few us per 4 KiB page inside the "
                                          "first requests' steps; the process then holds all of kv_cache_memory "
                                          "from the start. On by default for `asyncllm serve`")
    cpu_weight_prepack: bool = _opt(True, "CPU: keep a packed copy of the projection and logits weights for "
                                          "multi-row matmuls (column panels for the C kernels in fp32, else "
                                          "oneDNN's layout; faster batched decode and prefill; costs a second "
                                          "copy of those weights)")
    cpu_malloc_tuning: bool = _opt(True, "CPU, glibc: keep freed activation buffers in the heap (mallopt mmap and "
                                         "trim thresholds) instead of page-faulting them in again every step; "
                                         "prompts ~1.4x faster here; the process keeps its peak heap")
    quantization: str | None = _opt(None, "CPU steps of few rows (decoding up to 8 streams) read quantised "
                                          "copies of the projection weights, groups of 32 along the input: int4 "
                                          "(with the C kernels in fp32: llama.cpp's Q4_1 blocks, and Q8_0 "
                                          "blocks of the logits weight, computed in fp32; else torch's int4 "
                                          "kernel in bf16) or int8 (Q8_0 blocks of the projections and the "
                                          "logits weight; needs the C kernels); prompts and larger batches "
                                          "keep the dense weights, so it adds memory unless "
                                          "quantized_weights_only. A GPTQ, AWQ or compressed-tensors "
                                          "(pack-quantized) checkpoint is read from config.json and runs "
                                          "from its own codes (4-bit, or symmetric 8-bit, in groups of a "
                                          "multiple of 32 inputs; other layouts dequantised): leave this "
                                          "unset or name its method (gptq, awq, compressed-tensors). fp8: "
                                          "an FP8 checkpoint's projections run from their e4m3 codes (C "
                                          "kernels; else dequantised), and a dense checkpoint is quantised "
                                          "to e4m3 blocks with a scale per 32 inputs (vLLM's dynamic fp8, "
                                          "weights only: the CPU has no fp8 matmul; needs the C kernels)",
                                    choices=["int4", "int8", "gptq", "awq", "compressed-tensors", "fp8"])
    quantized_weights_only: bool = _opt(False, "with quantization on the C kernels in fp32: keep only the "
                                                "quantised blocks of the projections and free their dense "
                                                "weights and packed copies (the default model: ~0.85 GB less); "
                                                "prompts and batches of more than 8 rows then unpack the blocks "
                                                "panel by panel as they multiply (slower prefill and big "
                                                "batches); dtype auto means float32 here")
    gpu_memory_utilization: float = _opt(0.9, "CUDA: fraction of the GPU's memory this engine may hold: weights, "
                                              "the activation peak of a profiled max-size step, and the KV cache "
                                              "in what is left")
    enforce_eager: bool = _opt(False, "CUDA: run every step eagerly instead of replaying decode steps from CUDA "
                                      "graphs captured at start")
    cuda_graph_sizes: list[int] | str | None = _opt(
        None, "CUDA: the decode batch sizes captured as graphs (a list or comma-separated text; a batch is padded to "
              "the next one; default 1, 2, 4 and multiples of 8 up to max_num_seqs)")
    max_num_seqs: int = _opt(128, "most requests running at once")
    max_num_batched_tokens: int = _opt(1024, "token budget of one engine step (decodes + prompt chunks)")
    enable_chunked_prefill: bool = _opt(True, "split long prompts across steps so decodes keep going")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of shared prompt prefixes across requests")
    max_waiting_requests: int = _opt(1024, "admission limit: more waiting requests are refused (overloaded)")
    seed: int = _opt(0, "seed of the engine's unseeded sampling")
    speculative_config: dict | str | None = _opt(
        None, "speculative decoding, as vLLM's: a dict or its JSON text, e.g. {\"method\": \"ngram\", "
              "\"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5}; proposed "
              "tokens are verified in one forward, so the tokens are those of plain decoding; methods ngram, suffix, "
              "draft_model; no proposals while disable_by_batch_size (default 6) or more requests run")
    limit_mm_per_prompt: dict | str | None = _opt(
        None, "most images per prompt for models that take images (LLaVA), as vLLM's: {\"image\": N} or its JSON "
              "text (default 4)")
    enable_lora: bool = _opt(False, "serve LoRA adapters (PEFT folders) per request over the base model, "
                                    "mixed in one batch (vLLM's flag)")
    max_loras: int = _opt(1, "most distinct adapters running at once (requests of others wait); each takes a "
                             "device slot")
    max_lora_rank: int = _opt(16, "largest adapter rank accepted")
    max_cpu_loras: int | None = _opt(None, "adapters kept loaded in host memory, least recently used dropped "
                                           "(default: max_loras)")
    distributed_executor_backend: str | None = _opt(
        None, "where the model runs: uni (in the engine thread; the default), mp (a worker process per "
              "rank, steps sent as msgpack; a worker that dies fails every request with EngineDeadError; "
              "tensor_parallel_size or data_parallel_size > 1 imply it) or ray (each rank a Ray actor in a "
              "placement group of the Ray cluster that ray.init() finds or starts: RAY_ADDRESS, so the "
              "ranks may span machines; needs the ray extra)",
        choices=["uni", "mp", "ray"])
    kv_cache_dtype: str = _opt("auto", "the KV cache's element type: auto (the model's dtype) or fp8 (fp8_e4m3, "
                                       "scale 1: a quarter of fp32's bytes, half of bf16's; attention then runs on "
                                       "the torch ops, widening the cached keys and values)",
                               choices=["auto", "fp8", "fp8_e4m3"])
    execute_model_timeout: float = _opt(300.0, "seconds a step may take in the worker processes (mp) before they "
                                               "are deemed hung: they are stopped and every request fails with "
                                               "EngineDeadError")
    tensor_parallel_size: int = _opt(1, "ranks the model is split over (vLLM's -tp): worker processes joined by "
                                        "torch.distributed (gloo on the CPU, NCCL on CUDA), each holding its shard")
    pipeline_parallel_size: int = _opt(1, "stages the layers are split over (vLLM's -pp): worker processes per "
                                          "stage (tensor_parallel_size each), hidden states sent point to point "
                                          "between them, a batch in flight per stage; Llama-family decoders")
    data_parallel_size: int = _opt(1, "engine replicas (vLLM's -dp), each with its own scheduler, KV cache and worker "
                                      "process(es) (mp), behind one AsyncEngine / server; requests are routed by "
                                      "load and prefix-cache affinity. The CPU's cores are split between them")
    data_parallel_rank: int = _opt(0, "which replica this engine is (set by the data-parallel front; on CUDA it "
                                      "picks the replica's devices)")
    chat_template: str | None = _opt(None, "Jinja chat template file overriding the tokenizer's")
    served_model_name: str | None = _opt(None, "model name reported by the API (default: the model's name)")
    max_n: int = _opt(16, "largest n (parallel samples) a request may ask for")
    max_logprobs: int = _opt(20, "largest logprobs / prompt_logprobs a request may ask for")
    max_stop_strings: int = _opt(16, "most stop strings per request")
    max_stop_string_len: int = _opt(256, "longest stop string")
    max_tokens_limit: int | None = _opt(None, "largest max_tokens a request may ask for (default: max_model_len)")
    grammar_max_positions: int = _opt(5000, "structured outputs: most character positions a spec's automaton may "
                                            "have once counted repetitions are spelt out (b{5000}: ~2.7 s to "
                                            "compile); bigger specs are refused before compiling")
    grammar_max_wide_positions: int = _opt(256, "structured outputs: most bounded positions of free text (classes "
                                                "of >= 16 characters: [a-z]{1,N}, a string's maxLength), which "
                                                "cost ~70 KB and ~2 ms each to compile; more are refused")
    grammar_max_index_bytes: int = _opt(128 << 20, "structured outputs: largest compiled automaton (bytes)")
    grammar_compile_timeout: float = _opt(10.0, "structured outputs: seconds a request's compile may take "
                                                "(queueing included); past it the compile is killed and the "
                                                "request refused")
    grammar_compile_workers: int = _opt(2, "structured outputs: worker processes for specs that are not cheap "
                                           "(one more process compiles the cheap ones)")
    grammar_worker_memory: int = _opt(2 << 30, "structured outputs: address-space cap of each compile process "
                                               "(bytes)")
    structured_outputs_warmup: bool = _opt(False, "structured outputs: start the compile workers and the "
                                                  "json_object grammar at start, in the background (~7 s the "
                                                  "first time, then ~0.05 s from the disk cache), so the first "
                                                  "structured requests do not wait; on for `asyncllm serve`")

    def create_engine_config(self) -> "EngineConfig":
        return EngineConfig.from_args(self)

    def override(self, overrides: dict) -> None:
        """Sets each named argument (TypeError for a name that is not one)."""
        for key, value in overrides.items():
            if not hasattr(self, key):
                raise TypeError(f"unknown engine argument {key!r}")
            setattr(self, key, value)

    @property
    def world_size(self) -> int:
        """Processes of one replica: tensor-parallel ranks × pipeline stages (stage-major)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class EngineConfig:
    """EngineArgs after validation and defaulting; the engine reads only this."""

    args: EngineArgs
    device: torch.device
    dtype_request: str
    kernels: str  # "torch", "triton" or "cpu", resolved for the device
    kv_cache_memory: int | None
    limits: SamplingLimits
    structured_limits: StructuredLimits
    speculative: SpeculativeConfig | None = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> "EngineConfig":
        errors = []
        if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
            errors.append(f"dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}")
        if args.block_size < 1 or args.block_size & (args.block_size - 1):
            errors.append(f"block_size must be a power of two, got {args.block_size}")
        if args.max_num_seqs < 1:
            errors.append("max_num_seqs must be >= 1")
        if args.max_num_batched_tokens < 1:
            errors.append("max_num_batched_tokens must be >= 1")
        if args.max_model_len is not None and args.max_model_len < 2:
            errors.append("max_model_len must be >= 2")
        if not args.enable_chunked_prefill and args.max_model_len is not None \
                and args.max_num_batched_tokens < args.max_model_len:
            errors.append("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        if not 0 < args.gpu_memory_utilization <= 1:
            errors.append("gpu_memory_utilization must be in (0, 1]")
        try:
            parse_cuda_graph_sizes(args.cuda_graph_sizes, args.max_num_seqs)
        except ValueError as exc:
            errors.append(str(exc))
        if args.kernels not in ("auto", "torch", "triton", "cpu"):
            errors.append(f"kernels must be auto, torch, triton or cpu, got {args.kernels!r}")
        if args.kernels == "triton" and args.block_size < 16:
            errors.append("kernels='triton' needs block_size >= 16")
        if args.quantization not in (None, "int4", "int8", "gptq", "awq", "compressed-tensors", "fp8"):
            errors.append(f"quantization must be None, 'int4', 'int8', 'gptq', 'awq', 'compressed-tensors' or 'fp8', "
                          f"got {args.quantization!r}")
        if args.quantized_weights_only and args.quantization is None:
            errors.append("quantized_weights_only keeps only the quantised weights: set quantization too")
        if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
            errors.append("kv_cache_memory must be > 0 bytes")
        if args.grammar_compile_workers < 1:
            errors.append("grammar_compile_workers must be >= 1")
        if not args.grammar_compile_timeout > 0:
            errors.append("grammar_compile_timeout must be > 0 seconds")
        if args.distributed_executor_backend not in (None, "uni", "mp", "ray"):
            errors.append(f"distributed_executor_backend must be uni, mp or ray, got "
                          f"{args.distributed_executor_backend!r}")
        if args.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            errors.append(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3, got {args.kv_cache_dtype!r}")
        if not args.execute_model_timeout > 0:
            errors.append("execute_model_timeout must be > 0 seconds")
        for split, what in (("tensor_parallel_size", "rank"), ("pipeline_parallel_size", "stage")):
            size = getattr(args, split)
            if size < 1:
                errors.append(f"{split} must be >= 1")
            elif size > 1:
                if args.distributed_executor_backend == "uni":
                    errors.append(f"{split} > 1 runs a worker process per {what}: "
                                  "distributed_executor_backend must be mp, ray or unset")
                for flag in ("enable_lora", "quantized_weights_only"):
                    if getattr(args, flag):
                        errors.append(f"{flag} is not supported with {split} > 1 yet")
        if args.data_parallel_size < 1:
            errors.append("data_parallel_size must be >= 1")
        elif args.data_parallel_size > 1 and args.distributed_executor_backend == "uni":
            errors.append("data_parallel_size > 1 runs each replica's model in worker processes: "
                          "distributed_executor_backend must be mp, ray or unset")
        if not 0 <= args.data_parallel_rank < max(1, args.data_parallel_size):
            errors.append("data_parallel_rank must be in [0, data_parallel_size)")
        if args.enable_lora:
            if args.max_loras < 1:
                errors.append("max_loras must be >= 1")
            if args.max_lora_rank < 1:
                errors.append("max_lora_rank must be >= 1")
            if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
                errors.append("max_cpu_loras must be >= max_loras")
        if args.task not in ("auto", "generate", "embed"):
            errors.append(f"task must be auto, generate or embed, got {args.task!r}")
        try:
            parse_pooler_config(args.pooler_config)
        except ValueError as exc:
            errors.append(str(exc))
        try:
            parse_limit_mm_per_prompt(args.limit_mm_per_prompt)
        except ValueError as exc:
            errors.append(str(exc))
        speculative = None
        try:
            speculative = SpeculativeConfig.parse(args.speculative_config)
        except ValueError as exc:
            errors.append(str(exc))
        if speculative is not None and speculative.method == "draft_model" and (
                args.tensor_parallel_size > 1 or args.pipeline_parallel_size > 1):
            errors.append("speculative method 'draft_model' runs with tensor_parallel_size and "
                          "pipeline_parallel_size 1 so far")
        if errors:
            raise ValueError("invalid engine arguments: " + "; ".join(errors))
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)
        kernels = resolve_kernels(args, device)
        if args.quantization == "int4" and not int4_supported(device) and kernels != "triton":
            raise ValueError(f"quantization='int4' runs on the CPU (torch's int4 CPU kernel) or on the Triton "
                             f"kernels; this engine runs on {device.type} with kernels {kernels!r}: leave "
                             f"quantization unset there")
        if args.quantization == "int8" and kernels not in ("cpu", "triton"):
            raise ValueError(f"quantization='int8' reads 8-bit blocks with the C kernels (kernels='cpu', or 'auto' "
                             f"on a CPU where they build) or the Triton kernels; this engine has device "
                             f"{device.type!r} and kernels {kernels!r}: leave quantization unset there")
        if args.kv_cache_dtype != "auto" and kernels == "triton":
            raise ValueError("kv_cache_dtype='fp8' is not built in the Triton kernels: use kernels='torch' or the CPU")
        if args.quantized_weights_only and kernels not in ("cpu", "triton"):
            raise ValueError(f"quantized_weights_only keeps only the blocks the C kernels (kernels='cpu', or 'auto' on "
                             f"a CPU where they build) or the Triton kernels read; this engine has device "
                             f"{device.type!r} and kernels {kernels!r}")
        kv_mem = args.kv_cache_memory
        if kv_mem is None and device.type == "cpu":
            kv_mem = int(os.environ.get("ASYNCLLM_KV_CACHE_MEMORY", 1 << 30))
        limits = SamplingLimits(max_n=args.max_n, max_logprobs=args.max_logprobs,
                                max_stop_strings=args.max_stop_strings,
                                max_stop_string_len=args.max_stop_string_len)
        structured = StructuredLimits(max_positions=args.grammar_max_positions,
                                      max_wide_positions=args.grammar_max_wide_positions,
                                      max_index_bytes=args.grammar_max_index_bytes,
                                      compile_timeout_s=args.grammar_compile_timeout,
                                      compile_workers=args.grammar_compile_workers,
                                      worker_memory_bytes=args.grammar_worker_memory)
        return cls(args=args, device=device, dtype_request=args.dtype, kernels=kernels,
                   kv_cache_memory=kv_mem, limits=limits, structured_limits=structured, speculative=speculative)


def parse_cuda_graph_sizes(value: list[int] | str | None, max_num_seqs: int) -> list[int]:
    """EngineArgs.cuda_graph_sizes → sorted sizes (vLLM's defaults when None)."""
    from asyncllm.worker.cuda_graphs import default_capture_sizes

    if value is None:
        return default_capture_sizes(max_num_seqs)
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        sizes = sorted({int(str(p).strip()) for p in parts if str(p).strip()})
    except ValueError:
        raise ValueError(f"cuda_graph_sizes must be whole batch sizes, got {value!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"cuda_graph_sizes must be positive batch sizes, got {value!r}")
    return sizes


def triton_kernels_available() -> bool:
    try:
        import asyncllm_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernels(args: EngineArgs, device: torch.device) -> str:
    """Triton kernels run on CUDA; on the CPU only under Triton's interpreter (the tests' way to
    run the engine through them without a GPU). The C kernels run on the CPU; `auto` falls back
    to torch (with a warning saying why) where they do not build."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.kernels == "torch":
        return "torch"
    if args.kernels == "cpu" or (args.kernels == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError(f"kernels='cpu' runs on the CPU (this engine runs on {device.type}); use 'auto'")
        from asyncllm.kernels.cpu import library

        error = library.build_error()
        if error is None:
            return "cpu"
        if args.kernels == "cpu":
            raise ValueError(f"kernels='cpu': {error}")
        logger.warning("CPU kernels unavailable, using torch ops: %s", error)
        return "torch"
    if args.kernels == "auto":
        usable = device.type == "cuda" and args.block_size >= 16
        return "triton" if usable and triton_kernels_available() else "torch"
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"kernels='triton' needs a CUDA device (this engine runs on {device.type}); "
                         "use kernels='torch' or 'auto'")
    if not triton_kernels_available():
        raise ValueError("kernels='triton' needs the asyncllm-kernels package (pip install -e kernels)")
    return "triton"
