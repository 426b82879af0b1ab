"""GPTQ and AWQ checkpoints: tiny random models packed here by the published formats (the packers
below are written from the formats' definitions, separately from asyncllm's unpacking), loaded
by asyncllm from their packed tensors and compared with transformers running the weights the
checkpoint stands for (w = scale * (q - zero), dequantised here)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from asyncllm import LLM
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.block_quant import BlockQuantWeight

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack_awq: nibble i holds column col * 8 + order[i]

needs_c_kernels = pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels do not build here")


def _int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 → the int32 the checkpoint stores (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _quantize(weight: torch.Tensor, bits: int, group_of: torch.Tensor, groups: int, sym: bool):
    """Min-max codes of W [out, in] per (group, output) → q [in, out], zero [groups, out] ints,
    scale [groups, out] fp16 (the scale a 16-bit checkpoint stores)."""
    top = 2**bits - 1
    wt = weight.T.double()  # [in, out]
    scale = torch.empty(groups, wt.shape[1], dtype=torch.float16)
    zero = torch.empty(groups, wt.shape[1], dtype=torch.int64)
    for g in range(groups):
        rows = wt[group_of == g]
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            s = torch.maximum(hi, -lo) / (top // 2)
            z = torch.full_like(s, 2 ** (bits - 1), dtype=torch.int64)
        else:
            s = (hi - lo) / top
            z = torch.round(-lo / s).to(torch.int64).clamp(0, top)
        scale[g] = s.to(torch.float16)
        zero[g] = z
    s = scale.double()[group_of]
    q = torch.round(wt / s).to(torch.int64) + zero[group_of]
    return q.clamp(0, top), zero, scale


def dequantized(q, zero, scale, group_of) -> torch.Tensor:
    """The weight [out, in] a checkpoint stands for: scale[g(i), o] * (q[i, o] - zero[g(i), o])."""
    return (scale.double()[group_of] * (q - zero[group_of]).double()).float().T.contiguous()


def pack_gptq(weight, bits, group_size, desc_act, sym, seed):
    """GPTQ (AutoGPTQ, checkpoint_format gptq): qweight [in / p, out] with input row r * p + j at
    bits * j of word r; qzeros [groups, out / p] along the outputs, storing zero - 1; g_idx [in]."""
    out_f, in_f = weight.shape
    size = in_f if group_size == -1 else group_size
    groups = in_f // size
    if desc_act:  # act order: the groups are runs of a permutation of the inputs
        order = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
        group_of = torch.empty(in_f, dtype=torch.int64)
        group_of[order] = torch.arange(in_f) // size
    else:
        group_of = torch.arange(in_f) // size
    q, zero, scale = _quantize(weight, bits, group_of, groups, sym)
    p = 32 // bits
    qweight = torch.zeros(in_f // p, out_f, dtype=torch.int64)
    for r in range(in_f // p):
        for j in range(p):
            qweight[r] |= q[r * p + j] << (bits * j)
    stored = (zero - 1) & (2**bits - 1)
    qzeros = torch.zeros(groups, out_f // p, dtype=torch.int64)
    for c in range(out_f // p):
        for j in range(p):
            qzeros[:, c] |= stored[:, c * p + j] << (bits * j)
    tensors = {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": scale,
               "g_idx": group_of.to(torch.int32)}
    return tensors, dequantized(q, zero, scale, group_of)


def pack_awq(weight, group_size):
    """AWQ GEMM (AutoAWQ): qweight [in, out / 8] along the outputs in pack order 0 2 4 6 1 3 5 7,
    qzeros [groups, out / 8] alike, scales [groups, out]."""
    out_f, in_f = weight.shape
    size = in_f if group_size == -1 else group_size
    group_of = torch.arange(in_f) // size
    q, zero, scale = _quantize(weight, 4, group_of, in_f // size, sym=False)

    def pack(ints):
        words = torch.zeros(ints.shape[0], out_f // 8, dtype=torch.int64)
        for col in range(out_f // 8):
            for i in range(8):
                words[:, col] |= ints[:, col * 8 + AWQ_PACK_ORDER[i]] << (4 * i)
        return _int32(words)

    return {"qweight": pack(q), "qzeros": pack(zero), "scales": scale}, dequantized(q, zero, scale, group_of)


def write_quantized(dense_dir: str, path, method: str, quant_config: dict, pack) -> dict[str, torch.Tensor]:
    """A copy of `dense_dir` with every projection packed by `pack(name, weight)` → (tensors, its
    dequantised weight); → the dequantised weights by name (what transformers is given)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(dense_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(dense_dir, name), path)
    state = load_file(os.path.join(dense_dir, "model.safetensors"))
    out, reference = {}, {}
    for name, tensor in state.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(PROJECTIONS):
            packed, weight = pack(name, tensor)
            out.update({f"{prefix}.{part}": t for part, t in packed.items()})
            reference[name] = weight
        else:
            out[name] = tensor
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": method, **quant_config}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


def transformers_on(dense_dir: str, weights: dict[str, torch.Tensor]):
    hf = helpers.load_hf(dense_dir)
    with torch.no_grad():
        for name, weight in weights.items():
            hf.get_parameter(name).copy_(weight)
    return hf


def _engine(path, **kwargs) -> LLM:
    return LLM(str(path), kv_cache_memory=16 << 20, max_num_batched_tokens=20, **kwargs)


def _check_runs_from_the_checkpoints_codes(llm, expect_blocks: bool, bits: int = 4) -> None:
    projections = llm.engine.core.executor.worker.runner.model.projections()
    if expect_blocks:  # no dense copy: the checkpoint's codes in the C kernels' blocks, holding its weights exactly
        assert all(p.dense_dropped and isinstance(p.quantized, BlockQuantWeight) and p.quantized.exact
                   and p.quantized.bits == bits for p in projections)
    else:
        assert not any(p.dense_dropped for p in projections)


@needs_c_kernels
@pytest.mark.parametrize("arch, bits, group_size, sym", [
    ("LlamaForCausalLM", 4, 32, False),
    ("Qwen2ForCausalLM", 4, -1, True),   # biases beside the packed q/k/v; one group per row
    ("LlamaForCausalLM", 8, 64, True),   # symmetric 8 bits: Q8_0 blocks
])
def test_gptq_checkpoint_matches_transformers_on_its_dequantised_weights(tiny_models, tmp_path, arch, bits,
                                                                           group_size, sym):
    dense = tiny_models(arch)
    weights = write_quantized(dense, tmp_path / "gptq", "gptq",
                              {"bits": bits, "group_size": group_size, "desc_act": False, "sym": sym},
                              lambda name, w: pack_gptq(w, bits, group_size, False, sym, seed=len(name)))
    llm = _engine(tmp_path / "gptq")  # dtype auto: float32, what the blocks compute in
    try:
        _check_runs_from_the_checkpoints_codes(llm, expect_blocks=True, bits=bits)
        helpers.check_mixed_steps_match_transformers(llm, transformers_on(dense, weights))
    finally:
        llm.engine.shutdown()


@needs_c_kernels
def test_awq_checkpoint_matches_transformers_on_its_dequantised_weights(tiny_models, tmp_path):
    dense = tiny_models("LlamaForCausalLM")
    weights = write_quantized(dense, tmp_path / "awq", "awq",
                              {"bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
                              lambda name, w: pack_awq(w, 64))
    llm = _engine(tmp_path / "awq", quantization="awq")  # vLLM's spelling, agreeing with the checkpoint
    try:
        _check_runs_from_the_checkpoints_codes(llm, expect_blocks=True)
        helpers.check_mixed_steps_match_transformers(llm, transformers_on(dense, weights))
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("kernels", ["torch"] + (["cpu"] if cpu_kernels.build_error() is None else []))
def test_gptq_act_order_runs_dequantised(tiny_models, tmp_path, kernels):
    """desc_act: g_idx scatters each group over the inputs, which 32-input blocks cannot hold; the
    weights load dequantised (and so do all on the torch kernels), still the checkpoint's values."""
    dense = tiny_models("LlamaForCausalLM")
    weights = write_quantized(dense, tmp_path / "gptq", "gptq",
                              {"bits": 4, "group_size": 32, "desc_act": True, "sym": False},
                              lambda name, w: pack_gptq(w, 4, 32, True, False, seed=len(name)))
    llm = _engine(tmp_path / "gptq", dtype="float32", kernels=kernels)
    try:
        _check_runs_from_the_checkpoints_codes(llm, expect_blocks=False)
        helpers.check_mixed_steps_match_transformers(llm, transformers_on(dense, weights), max_tokens=12)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("quant_config, engine_args, message", [
    ({"quant_method": "fp8"}, {}, "quant_method 'fp8' is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, {}, "GPTQ with 3 bits"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, {}, "AWQ version 'gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, {"quantization": "int4"}, "is a gptq checkpoint"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, {"quantization": "awq"}, "is a gptq checkpoint"),
])
def test_unsupported_quantization_is_refused_with_why(tiny_models, tmp_path, quant_config, engine_args, message):
    dense = tiny_models("LlamaForCausalLM")
    shutil.copytree(dense, tmp_path / "q")
    with open(tmp_path / "q" / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = quant_config
    with open(tmp_path / "q" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=message):
        _engine(tmp_path / "q", **engine_args)


def test_gptq_asked_of_a_dense_checkpoint_is_refused(tiny_models):
    with pytest.raises(ValueError, match="needs a gptq checkpoint"):
        _engine(tiny_models("LlamaForCausalLM"), quantization="gptq")


def test_a_packed_projection_missing_its_zeros_is_refused(tiny_models, tmp_path):
    dense = tiny_models("LlamaForCausalLM")
    write_quantized(dense, tmp_path / "gptq", "gptq", {"bits": 4, "group_size": 32, "desc_act": False},
                    lambda name, w: pack_gptq(w, 4, 32, False, False, seed=0))
    state = load_file(tmp_path / "gptq" / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.qzeros"]
    save_file(state, tmp_path / "gptq" / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj' has no qzeros"):
        _engine(tmp_path / "gptq")


@needs_c_kernels
def test_gptq_checkpoint_split_over_two_ranks(tiny_models, tmp_path):
    """Tensor parallel: each rank keeps its rows (q/k/v, gate/up) or its whole groups of columns
    (o, down) of the packed codes."""
    dense = tiny_models("LlamaForCausalLM")
    weights = write_quantized(dense, tmp_path / "gptq", "gptq", {"bits": 4, "group_size": 32, "desc_act": False},
                              lambda name, w: pack_gptq(w, 4, 32, False, False, seed=len(name)))
    llm = _engine(tmp_path / "gptq", tensor_parallel_size=2)
    try:
        helpers.check_mixed_steps_match_transformers(llm, transformers_on(dense, weights), max_tokens=12)
    finally:
        llm.engine.shutdown()
