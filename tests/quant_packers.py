"""GPTQ and AWQ packers written from the formats' definitions (AutoGPTQ's and AutoAWQ's layouts),
separately from asyncllm's unpacking (asyncllm/model/checkpoint_quant.py): the tests and
benchmarks/quantized_checkpoint.py build checkpoints with them."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack_awq: nibble i holds column col * 8 + order[i]


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


def write_quantized(dense_dir: str, path, quantization_config: dict, pack) -> dict[str, torch.Tensor]:
    """A copy of `dense_dir` with every projection replaced by `pack(name, weight)` → (its tensors by
    part name: qweight..., or weight + weight_scale..., the weight they stand for) and config.json's
    quantization_config set; → the weights they stand for, by name (what transformers is given)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(dense_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(dense_dir, name), path)
    out, reference = {}, {}
    for name, tensor in load_file(os.path.join(dense_dir, "model.safetensors")).items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(PROJECTIONS):
            packed, reference[name] = pack(name, tensor)
            out.update({f"{prefix}.{part}": t.contiguous() for part, t in packed.items()})
        else:
            out[name] = tensor
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


def transformers_on(dense_dir: str, weights: dict[str, torch.Tensor]):
    """transformers on `dense_dir` with `weights` (by name) copied in."""
    import helpers

    hf = helpers.load_hf(dense_dir)
    with torch.no_grad():
        for name, weight in weights.items():
            hf.get_parameter(name).copy_(weight)
    return hf


def check_checkpoint(path, dense_dir: str, weights: dict[str, torch.Tensor], check=None, max_tokens: int = 24,
                     **engine_args) -> None:
    """An engine on the quantised folder `path` (small KV cache, chunked prompts) gives transformers'
    greedy ids and logprobs on the weights it stands for; `check(llm)` first, if given."""
    import helpers
    from asyncllm import LLM

    llm = LLM(str(path), kv_cache_memory=16 << 20, max_num_batched_tokens=20, **engine_args)
    try:
        if check is not None:
            check(llm)
        helpers.check_mixed_steps_match_transformers(llm, transformers_on(dense_dir, weights), max_tokens=max_tokens)
    finally:
        llm.engine.shutdown()


FP8_MAX = 448.0  # e4m3fn's largest finite value


def to_fp8(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (float8 weight, its scales, the weight they stand for)."""
    out_f, in_f = weight.shape
    if block is None:  # one scale per output row
        scale = weight.abs().amax(1, keepdim=True) / FP8_MAX
        q = (weight / scale).to(torch.float8_e4m3fn)
        return q, scale, q.float() * scale
    bo, bi = block
    blocks = weight.reshape(out_f // bo, bo, in_f // bi, bi)
    scale = blocks.abs().amax((1, 3)) / FP8_MAX  # [out / bo, in / bi]
    q = (blocks / scale[:, None, :, None]).reshape(out_f, in_f).to(torch.float8_e4m3fn)
    dense = (q.float().reshape(out_f // bo, bo, in_f // bi, bi) * scale[:, None, :, None]).reshape(out_f, in_f)
    return q, scale, dense


def write_fp8(dense_dir: str, path, block: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Per block: weight_scale_inv; per row: weight_scale, with a static input scale beside."""
    def pack(name, weight):
        q, scale, dense = to_fp8(weight, block)
        if block is not None:
            return {"weight": q, "weight_scale_inv": scale}, dense
        return {"weight": q, "weight_scale": scale, "input_scale": torch.tensor([0.05])}, dense

    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static" if block is None else "dynamic",
              **({"weight_block_size": list(block)} if block else {})}
    return write_quantized(dense_dir, path, config, pack)
