"""GPTQ and AWQ checkpoints: tiny random models packed by the published formats (tests/quant_packers.py,
written from the formats' definitions, separately from asyncllm's unpacking), loaded
by asyncllm from their packed tensors and compared with transformers running the weights the
checkpoint stands for (w = scale * (q - zero), dequantised here)."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import helpers
from asyncllm import LLM
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.block_quant import BlockQuantWeight
from quant_packers import check_checkpoint, pack_awq, pack_gptq, write_quantized



def gptq(bits: int, group_size: int, desc_act: bool = False, sym: bool = False):
    """(quantization_config, packer) of a GPTQ checkpoint."""
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym}
    return config, lambda name, w: pack_gptq(w, bits, group_size, desc_act, sym, seed=len(name))


def runs_from_the_checkpoints_codes(bits: int = 4):
    def check(llm) -> None:  # no dense copy: the codes in the C kernels' blocks, holding the weights exactly
        projections = llm.engine.core.executor.worker.runner.model.projections()
        assert all(p.dense_dropped and isinstance(p.quantized, BlockQuantWeight) and p.quantized.exact
                   and p.quantized.bits == bits for p in projections)
    return check


def runs_dense(llm) -> None:
    assert not any(p.dense_dropped for p in llm.engine.core.executor.worker.runner.model.projections())


@helpers.needs_c_kernels
@pytest.mark.parametrize("arch, bits, group_size, sym", [
    ("LlamaForCausalLM", 4, 32, False),
    ("Qwen2ForCausalLM", 4, -1, True),   # biases beside the packed q/k/v; one group per row
    ("LlamaForCausalLM", 8, 64, True),   # symmetric 8 bits: Q8_0 blocks
])
def test_gptq_checkpoint_matches_transformers_on_its_dequantised_weights(tiny_models, tmp_path, arch, bits,
                                                                           group_size, sym):
    dense = tiny_models(arch)
    weights = write_quantized(dense, tmp_path / "gptq", *gptq(bits, group_size, sym=sym))
    # dtype auto: float32, what the blocks compute in
    check_checkpoint(tmp_path / "gptq", dense, weights, check=runs_from_the_checkpoints_codes(bits))


@helpers.needs_c_kernels
def test_awq_checkpoint_matches_transformers_on_its_dequantised_weights(tiny_models, tmp_path):
    dense = tiny_models("LlamaForCausalLM")
    weights = write_quantized(dense, tmp_path / "awq",
                              {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                               "version": "gemm"}, lambda name, w: pack_awq(w, 64))
    check_checkpoint(tmp_path / "awq", dense, weights, check=runs_from_the_checkpoints_codes(),
                     quantization="awq")  # vLLM's spelling, agreeing with the checkpoint


@pytest.mark.parametrize("kernels", ["torch"] + (["cpu"] if cpu_kernels.build_error() is None else []))
def test_gptq_act_order_runs_dequantised(tiny_models, tmp_path, kernels):
    """desc_act: g_idx scatters each group over the inputs, which 32-input blocks cannot hold; the
    weights load dequantised (and so do all on the torch kernels), still the checkpoint's values."""
    dense = tiny_models("LlamaForCausalLM")
    weights = write_quantized(dense, tmp_path / "gptq", *gptq(4, 32, desc_act=True))
    check_checkpoint(tmp_path / "gptq", dense, weights, check=runs_dense, max_tokens=12, dtype="float32",
                     kernels=kernels)


@helpers.needs_c_kernels
def test_gptq_checkpoint_split_over_two_ranks(tiny_models, tmp_path):
    """Tensor parallel: each rank keeps its rows (q/k/v, gate/up) or its whole groups of columns
    (o, down) of the packed codes."""
    dense = tiny_models("LlamaForCausalLM")
    weights = write_quantized(dense, tmp_path / "gptq", *gptq(4, 32))
    check_checkpoint(tmp_path / "gptq", dense, weights, max_tokens=12, tensor_parallel_size=2)


def _engine(path, **kwargs) -> LLM:
    return LLM(str(path), kv_cache_memory=16 << 20, **kwargs)


@pytest.mark.parametrize("quant_config, engine_args, message", [
    ({"quant_method": "bitsandbytes"}, {}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, {}, "fp8 fmt 'e5m2' is not supported"),
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
    write_quantized(tiny_models("LlamaForCausalLM"), tmp_path / "gptq", *gptq(4, 32))
    state = load_file(tmp_path / "gptq" / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.qzeros"]
    save_file(state, tmp_path / "gptq" / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj' has no qzeros"):
        _engine(tmp_path / "gptq")
