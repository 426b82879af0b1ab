"""GGUF tensors repacked from the file's bytes into the C kernels' blocks (asyncllm/model/gguf_blocks.py):
every Q4_0 / Q4_1 / Q4_K / Q5_0 / Q8_0 tensor of the real files comes back bit for bit as gguf's
dequantisation computes it, and `quantization` int4 / int8 of a GGUF keeps those codes: tiny
llama.cpp-style GGUFs give transformers' tokens (transformers loads the same file)."""
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import helpers
from asyncllm import LLM
from asyncllm.model.gguf_blocks import EXACT_BITS, gguf_groups
from asyncllm.model.gguf_file import GGUFFile
from asyncllm.model.layers.block_quant import BlockQuantWeight



def _check_file(path: str) -> dict[str, int]:
    """Every 2-D tensor of an exact type: groups → blocks → the values gguf dequantises. → count per type."""
    counts: dict[str, int] = {}
    with GGUFFile(path) as gguf:
        for name, info in gguf.tensors.items():
            if info.qtype not in EXACT_BITS or len(info.shape) != 2:
                continue
            groups = gguf_groups(gguf.raw(name), info.qtype, info.shape)
            assert groups.bits == EXACT_BITS[info.qtype]
            want = gguf.load(name)
            assert torch.equal(groups.rounded_once(), want), name
            if info.shape[0] % 16 == 0:  # through the block layout the kernels read
                assert torch.equal(BlockQuantWeight.from_groups(groups).dequantize(), want), name
            counts[info.qtype.name] = counts.get(info.qtype.name, 0) + 1
    return counts


def test_default_models_tensors_repack_exactly(default_gguf):
    counts = _check_file(default_gguf)
    assert counts.get("Q4_1", 0) >= 200 and counts.get("Q8_0", 0) >= 1, counts


def test_gemma3_k_quant_files_q4_k_and_q5_0_tensors_repack_exactly(gemma3_gguf):
    counts = _check_file(gemma3_gguf)
    assert counts.get("Q4_K", 0) > 0 and counts.get("Q5_0", 0) > 0 and counts.get("Q8_0", 0) > 0, counts


def test_q4_0_and_q5_0_repack_exactly(tmp_path):
    import gguf
    import numpy as np

    values = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    for qtype in (Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q8_0):
        raw = gguf.quants.quantize(values, qtype)
        groups = gguf_groups(raw.reshape(48, -1), qtype, (48, 96))
        want = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(48, 96)
        assert torch.equal(groups.rounded_once(), want), qtype.name
        assert torch.equal(BlockQuantWeight.from_groups(groups).dequantize(), want), qtype.name
    assert gguf_groups(np.zeros((4, 210), np.uint8), Q.Q6_K, (4, 256)) is None  # no exact block form


@helpers.needs_c_kernels
@pytest.mark.parametrize("qtype, quantization", [(Q.Q4_0, "int4"), (Q.Q5_0, "int8"), (Q.Q8_0, "int8")])
def test_quantized_gguf_keeps_the_files_codes_and_matches_transformers(qtype, quantization, tiny_models,
                                                                       default_gguf, tmp_path):
    """A llama.cpp-layout GGUF (Q/K rows permuted; the embedding and output weight Q8_0, as llama.cpp's
    4-bit files keep them) whose projections the requested blocks hold exactly: with only the
    blocks kept (the embedding and logits too), greedy ids and logprobs equal transformers on the
    same file."""
    path = str(tmp_path / "tiny.gguf")
    helpers.write_llama_gguf(helpers.plain_llama(tiny_models), path, default_gguf, qtype, embedding_qtype=Q.Q8_0)
    llm = LLM(path, dtype="float32", quantization=quantization, quantized_weights_only=True, kv_cache_memory=16 << 20,
              max_num_batched_tokens=20)
    try:
        model = llm.engine.core.executor.worker.runner.model
        assert all(p.dense_dropped and p.quantized.exact and p.quantized.bits == (4 if quantization == "int4" else 8)
                   for p in model.projections())
        assert model.logits_only_blocks and model.embed_tokens.weight.numel() == 0
        helpers.check_gguf_greedy_matches_transformers(llm, path, helpers.TEXT_PROMPTS[:3])
    finally:
        llm.engine.shutdown()
