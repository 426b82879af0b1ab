"""dtype="auto" on the CPU, decided by timing whole steps: the compute dtype and, for a GGUF whose
every projection some int4 / int8 blocks hold exactly, whether to run from those blocks alone.

Candidates: fp32 dense; bf16 dense where a bf16 matmul is not far slower than fp32 (on AVX2-only
CPUs it is ~100x slower: no point timing a whole step); fp32 on the file's own blocks with no
dense copy (the same weights, hence the same tokens as fp32 dense). Each is timed on a model of
the checkpoint's shape cut to a few layers, with random weights: a 128-token prompt step and
8-row decode steps, scaled to the full depth and scored as W2 (8 streams of 128-token prompts
and 64 tokens out) output tokens/s. The first candidate (the one-matmul rule's dtype, dense)
is kept unless another beats it by MARGIN, so run-to-run noise does not flip the setting.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass

import torch

from asyncllm.model.dtype import cpu_matmul_seconds, matmul_rule_dtype
from asyncllm.model.interface import ModelContext
from asyncllm.model.layers.int4 import int4_max_rows
from asyncllm.model.layers.linear import prepack_supported
from asyncllm.model.layers.ops import Ops
from asyncllm.model.registry import build_model
from asyncllm.worker.cpu_allocator import return_freed_memory
from asyncllm.worker.memory_profile import dummy_batch
from asyncllm.worker.model_runner import KVCacheSpec

logger = logging.getLogger(__name__)

MARGIN = 1.10  # another setting must be this much faster than the first to be picked
PROMPT_TOKENS, STREAMS, OUTPUT_TOKENS = 128, 8, 64  # W2's shape (benchmarks/serving.py)
BF16_TOO_SLOW = 2.0  # bf16 matmul this many times slower than fp32: not a candidate
_CUT_PARAMS = 12_000_000  # the cut model's layers hold at most about this many parameters (and >= 1 layer)
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class CpuSetting:
    """What auto runs: the compute dtype, and the bits of the GGUF's exact blocks when the model
    keeps only those (quantization int4/int8 with quantized_weights_only), else None."""
    dtype: torch.dtype
    block_bits: int | None = None

    @property
    def quantization(self) -> str | None:
        return None if self.block_bits is None else f"int{self.block_bits}"

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return name if self.block_bits is None else f"{name} on the file's {self.block_bits}-bit blocks only"


@dataclass(frozen=True)
class SettingTiming:
    setting: CpuSetting
    prompt_seconds: float  # one 128-token prompt step of the whole model, with its one logits row
    decode_seconds: float  # one step of 8 decode rows, with their logits

    @property
    def w2_tokens_per_second(self) -> float:
        """Output tok/s of W2-shaped serving: each request's prompt step, plus its share of the
        8-row decode steps that produce its tokens."""
        return OUTPUT_TOKENS / (self.prompt_seconds + OUTPUT_TOKENS * self.decode_seconds / STREAMS)


def candidates(block_bits: int | None) -> list[CpuSetting]:
    """The settings worth timing on this CPU, the one-matmul rule's dtype first; `block_bits`: the
    bits of the exact blocks the checkpoint's projections have (None: none or not all)."""
    fp32, bf16 = cpu_matmul_seconds()
    first = CpuSetting(matmul_rule_dtype(fp32, bf16))
    found = [first]
    if first.dtype == torch.float32 and bf16 < BF16_TOO_SLOW * fp32:
        found.append(CpuSetting(torch.bfloat16))
    elif first.dtype == torch.bfloat16:
        found.append(CpuSetting(torch.float32))
    if block_bits is not None:
        found.append(CpuSetting(torch.float32, block_bits))
    return found


def choose(model_config, settings: list[CpuSetting], kernels: str, prepack: bool) -> tuple[CpuSetting,
                                                                                          list[SettingTiming]]:
    """The setting to run (see the module doc), and every candidate's timing (logged at start)."""
    if len(settings) == 1:
        return settings[0], []
    timings = [time_setting(model_config, s, kernels, prepack) for s in settings]
    return_freed_memory()  # the timed models' memory back to the OS before the real load (~120 MB here)
    best = max(timings, key=lambda t: t.w2_tokens_per_second)
    chosen = best if best.w2_tokens_per_second > MARGIN * timings[0].w2_tokens_per_second else timings[0]
    logger.info("dtype=auto: W2-shaped steps timed on %d of %d layers: %s -> %s", _cut_layers(model_config),
                model_config.num_layers, "; ".join(
                    f"{t.setting} {t.w2_tokens_per_second:.0f} tok/s (prompt {t.prompt_seconds * 1e3:.1f} ms, "
                    f"8-row decode {t.decode_seconds * 1e3:.2f} ms)" for t in timings), chosen.setting)
    return chosen.setting, timings


@functools.lru_cache(maxsize=8)
def time_setting(model_config, setting: CpuSetting, kernels: str, prepack: bool) -> SettingTiming:
    """Times `setting` on the cut model (cached per shape: engines of one model in a process agree)."""
    layers = _cut_layers(model_config)
    cut = dataclasses.replace(model_config, num_layers=layers, sliding_layers=(
        None if model_config.sliding_layers is None else model_config.sliding_layers[:layers]))
    model = _random_model(cut, setting, kernels, prepack)
    scale = model_config.num_layers / layers
    spec = KVCacheSpec(layers, model_config.num_kv_heads, model_config.head_dim, 16, setting.dtype)
    prompt = _step_seconds(model, spec, [(PROMPT_TOKENS, PROMPT_TOKENS)], 1, scale)
    decode = _step_seconds(model, spec, [(PROMPT_TOKENS + OUTPUT_TOKENS // 2, 1)] * STREAMS, STREAMS, scale)
    return SettingTiming(setting, prompt, decode)


def _cut_layers(model_config) -> int:
    per_layer = model_config.hidden_size * (
        (model_config.num_heads + 2 * model_config.num_kv_heads) * model_config.head_dim
        + model_config.num_heads * model_config.head_dim + 3 * model_config.intermediate_size)
    return max(1, min(model_config.num_layers, _CUT_PARAMS // max(1, per_layer)))


@torch.inference_mode()
def _random_model(model_config, setting: CpuSetting, kernels: str, prepack: bool) -> torch.nn.Module:
    """The model with random weights (finite, of a trained model's scale), packed and quantised as
    the worker would for `setting`."""
    ops = Ops(kernels)
    model = build_model(model_config, setting.dtype, _CPU, ModelContext(ops))
    # Speed does not depend on the values as long as they are finite and normal: one random run
    # repeated over each weight is as good as fresh ones and costs a copy.
    pattern = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 0.02
    for parameter in model.parameters():
        if parameter.dim() < 2:
            parameter.fill_(1.0)  # norms and biases
        else:
            flat = parameter.view(-1)
            flat.copy_(pattern.to(parameter.dtype).repeat(-(-flat.numel() // pattern.numel()))[:flat.numel()])
    if setting.block_bits is not None:
        model.quantize(setting.block_bits, int4_rows=int4_max_rows(setting.dtype))
        model.drop_dense_projections()
    if prepack and prepack_supported(_CPU, setting.dtype, ops):
        model.prepack_weights()
    return model.eval()


@torch.inference_mode()
def _step_seconds(model: torch.nn.Module, spec, sequences: list[tuple[int, int]], logit_rows: int,
                  scale: float) -> float:
    """The fastest of a few runs of one step: the layers' time times `scale` (the full depth over
    the cut one), plus the logits of its last `logit_rows` rows."""
    input_ids, positions, meta, blocks = dummy_batch(spec, sequences, _CPU)
    caches = spec.allocate(blocks, _CPU, True)
    best_layers = best_logits = float("inf")
    for _ in range(5):  # the first run warms up (page faults, packed copies, the decoder's buffers); min of the rest
        meta._memo.clear()
        start = time.perf_counter()
        hidden = model(input_ids, positions, caches, meta)
        middle = time.perf_counter()
        model.compute_logits(hidden[-logit_rows:])
        end = time.perf_counter()
        best_layers, best_logits = min(best_layers, middle - start), min(best_logits, end - middle)
    return best_layers * scale + best_logits
