"""EngineArgs.quantized_weights_only: the projections keep only their C blocks (int4 / int8), and
steps of more rows than the block kernel takes multiply the weight the blocks hold, unpacked panel
by panel (cpu_kernels.panel_linear_blocks)."""
import pytest
import torch

import helpers
from asyncllm import LLM
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.block_quant import BlockQuantWeight
from asyncllm.model.layers.int4 import FP8_BITS
from asyncllm.model.layers.linear import Linear
from asyncllm.model.layers.ops import Ops

pytestmark = pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels do not build here")


@pytest.mark.parametrize("bits", [4, 8, FP8_BITS])
@pytest.mark.parametrize("n, k", [(96, 576), (80, 64), (16, 1536)])  # n not a whole panel; one panel, part-filled
@pytest.mark.parametrize("rows", [1, 7, 9, 64, 300])
def test_panel_linear_blocks_equals_the_panel_gemm_of_the_dequantised_weight(bits, n, k, rows):
    """Bit for bit what panel_linear computes against pack_panels of the weight the blocks hold
    (BlockQuantWeight.dequantize, the torch reference of what the block kernel multiplies)."""
    torch.manual_seed(bits * 1000 + rows)
    q = BlockQuantWeight.quantize(torch.randn(n, k), bits=bits)
    x, bias = torch.randn(rows, k), torch.randn(n)
    for b in (None, bias):
        want = cpu_kernels.panel_linear(x, cpu_kernels.pack_panels(q.dequantize()), n, b)
        assert torch.equal(q.linear_many_rows(x, b), want)
    # and close to float64 arithmetic on that weight
    exact = x.double() @ q.dequantize().double().t()
    assert (q.linear_many_rows(x).double() - exact).abs().max().item() < 1e-3


def test_default_model_int4_weights_only_equals_fp32_and_frees_the_dense_weights(default_llm):
    """The default model's projections are Q4_1 in its file, so its 4-bit blocks hold the fp32
    weights exactly: with only the blocks kept, prompts (panel GEMM on the unpacked panels) and
    decode steps (the block kernel) give the dense fp32 engine's tokens, and logprobs within 1e-4
    (the dense weights take the panel GEMM's order at every row count)."""
    llm = LLM(dtype="float32", quantization="int4", quantized_weights_only=True, kv_cache_memory=64 << 20)
    model = llm.engine.core.executor.worker.runner.model
    projections = model.projections()
    assert all(p.dense_dropped and p.weight.numel() == 0 and not p.prepacked.is_packed for p in projections)
    assert all(isinstance(p.quantized, BlockQuantWeight) and p.quantized.exact for p in projections)
    # Its tied embedding is Q8_0 in the file: the logits' 8-bit copy is exact, so it is the embedding too.
    assert model.logits_quant.exact and model.embed_tokens.blocks is model.logits_quant and model.logits_only_blocks
    assert model.embed_tokens.weight.numel() == 0 and not model.logits_linear.is_packed
    helpers.check_same_as_reference_engine(llm, default_llm)
    # Prompt logprobs: logits of every prompt row at once (more than 8), from the blocks by the panel GEMM.
    from asyncllm import SamplingParams

    ids = llm.get_tokenizer().encode(" ".join(helpers.TEXT_PROMPTS[:6]))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    ours, theirs = (e.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].prompt_logprobs
                    for e in (llm, default_llm))
    assert len(ours) == len(ids) > 16 and ours[0] is None
    for a, b in zip(ours[1:], theirs[1:]):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    llm.engine.shutdown()


def test_tiny_model_int8_weights_only_stays_close_to_transformers(tiny_models):
    """Random fp32 weights (lossy 8-bit blocks): prompt chunks, mixed steps and decode all compute
    with the blocks' weight; greedy ids equal transformers' run on that same dequantised weight."""
    path = tiny_models("LlamaForCausalLM")
    llm = LLM(path, dtype="float32", quantization="int8", quantized_weights_only=True, kernels="cpu",
              kv_cache_memory=16 << 20, max_num_batched_tokens=20)
    model = llm.engine.core.executor.worker.runner.model
    assert all(p.dense_dropped for p in model.projections())
    hf = helpers.load_hf(path)
    with torch.no_grad():  # transformers on the weights the blocks hold (the logits: their 8-bit copy)
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear):  # a new parameter: unties lm_head from the embedding
                module.weight = torch.nn.Parameter(BlockQuantWeight.quantize(module.weight.float(), 8).dequantize())
    helpers.check_mixed_steps_match_transformers(llm, hf)


def test_quantized_weights_only_errors_are_clear(tiny_models):
    path = tiny_models("LlamaForCausalLM")
    with pytest.raises(ValueError, match="set quantization too"):
        LLM(path, dtype="float32", quantized_weights_only=True)
    with pytest.raises(ValueError, match="keeps only the blocks the C kernels"):
        LLM(path, dtype="float32", quantization="int4", quantized_weights_only=True, kernels="torch")
    with pytest.raises(ValueError, match="needs dtype float32"):
        LLM(path, dtype="bfloat16", quantization="int8", quantized_weights_only=True, kernels="cpu")
    # dtype="auto" (bf16 on some CPUs) takes fp32 here instead of refusing
    auto = LLM(path, quantization="int8", quantized_weights_only=True, kernels="cpu", kv_cache_memory=16 << 20)
    assert auto.engine.core.dtype == torch.float32


def test_drop_dense_refuses_a_projection_without_blocks():
    layer = Linear(64, 32, bias=False, ops=Ops("cpu"))
    with pytest.raises(ValueError, match="only an fp32 projection with C blocks"):
        layer.drop_dense()
    assert layer.weight.shape == (32, 64)  # nothing lost


@pytest.mark.parametrize("keep_dense", [False, True])
def test_groups_of_every_row_become_blocks_and_the_dense_weight_is_written_only_if_kept(keep_dense):
    """A fused projection whose parts all come as exact groups: its blocks are those groups; without
    keep_dense (quantized_weights_only, a GPTQ / AWQ checkpoint) the dense weight is never written."""
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=False, ops=Ops("cpu"))
    parts = [_q8_0_groups(torch.randn(rows, 64) * 0.1) for rows in (16, 32)]
    layer.take_checkpoint_groups(0, parts[0][1], keep_dense)
    assert layer.quantized is None and layer.checkpoint_groups  # waits for the other rows
    layer.take_checkpoint_groups(16, parts[1][1], keep_dense)
    want = torch.cat([p[0] for p in parts])
    assert layer.on_checkpoint_blocks and torch.equal(layer.quantized.dequantize(), want)
    assert not layer.checkpoint_groups
    if keep_dense:
        assert torch.equal(layer.weight, want)
    else:
        assert layer.dense_dropped and layer.weight.numel() == 0


def test_rows_of_a_projection_not_all_groups_are_written_dense_at_the_end():
    """q and k as exact groups, v as a dense tensor (a GGUF whose v is Q6_K): no blocks, and the
    held rows are written into the dense weight by finish_checkpoint_groups."""
    torch.manual_seed(1)
    layer = Linear(64, 48, bias=False, ops=Ops("cpu"))
    held, groups = _q8_0_groups(torch.randn(32, 64) * 0.1)
    layer.take_checkpoint_groups(0, groups, keep_dense=False)
    dense = torch.randn(16, 64)
    layer.weight.data[32:].copy_(dense)
    layer.finish_checkpoint_groups()
    assert layer.quantized is None and not layer.checkpoint_groups
    assert torch.equal(layer.weight[:32], held) and torch.equal(layer.weight[32:], dense)


def _q8_0_groups(weight: torch.Tensor):
    """(the values, their exact 8-bit groups): a Q8_0 tensor of a GGUF, built with gguf's own quantiser."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from asyncllm.model.gguf_blocks import gguf_groups

    raw = quants.quantize(weight.numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
    values = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0).copy()).float()
    return values, gguf_groups(raw, GGMLQuantizationType.Q8_0, tuple(weight.shape))


_LOAD_PEAK_SCRIPT = """
import json, os, resource, sys
import torch
from asyncllm import LLM
from asyncllm.model.default_model import default_model_path
from asyncllm.model.loader import load_checkpoint
load_checkpoint(None)  # the libraries opening a checkpoint imports (config, GGUF tokenizer), not the load's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
llm = LLM(dtype="float32", quantization="int4", quantized_weights_only=True, kv_cache_memory=16 << 20)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
projections = llm.engine.core.executor.worker.runner.model.projections()
print(json.dumps({"peak_added_mb": (peak - before) / 1024, "dynamo": "torch._dynamo" in sys.modules,
                  "file_mb": os.path.getsize(default_model_path()) / 2 ** 20,
                  "dense_mb": sum(p.in_features * p.out_features * 4 for p in projections) / 2 ** 20}))
llm.engine.shutdown()
"""


def test_loading_only_the_blocks_never_materialises_the_dense_model():
    """The default model's Q4_1 projections and Q8_0 embedding go from the file to blocks, the
    file's pages dropped as each tensor is read: the load raises the process's peak RSS (the peak
    after one opening of the checkpoint) by less than twice the file (~1.3x measured; it was ~19x,
    4x the dense fp32 projections: dense weights, panels, int32 codes, the fp32 embedding), never
    by the dense model, and building the model imports no torch._dynamo / triton (~140 MB).
    benchmarks/memory.py measures the peak above the RSS before the load instead (VmHWM reset):
    193 MB."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LOAD_PEAK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["dynamo"]
    assert result["peak_added_mb"] < min(2 * result["file_mb"], result["dense_mb"] / 2), result
