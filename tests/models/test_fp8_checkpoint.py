"""FP8 checkpoints (quant_method "fp8"): float8_e4m3fn weights with block scales (weight_scale_inv)
or per-row scales (weight_scale, with static input scales beside), written here as the format
says, load dequantised and equal transformers on those dequantised weights."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncllm import LLM
from quant_packers import check_checkpoint, write_quantized

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


@pytest.mark.parametrize("block", [(32, 32), None])
def test_fp8_checkpoint_matches_transformers_on_its_dequantised_weights(tiny_models, tmp_path, block):
    dense = tiny_models("LlamaForCausalLM")
    weights = write_fp8(dense, tmp_path / "fp8", block)
    check_checkpoint(tmp_path / "fp8", dense, weights, dtype="float32", quantization="fp8")


def test_fp8_of_a_dense_checkpoint_and_a_missing_scale_are_refused(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="quantization='fp8' of a dense checkpoint"):
        LLM(tiny_models("LlamaForCausalLM"), quantization="fp8", kv_cache_memory=16 << 20)
    write_fp8(tiny_models("LlamaForCausalLM"), tmp_path / "fp8", (32, 32))
    state = load_file(tmp_path / "fp8" / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(state, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(ValueError, match="o_proj' has no weight_scale_inv"):
        LLM(str(tmp_path / "fp8"), kv_cache_memory=16 << 20)
