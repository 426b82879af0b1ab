"""dtype="auto" on the CPU (worker/auto_setting.py): which settings are timed, how the timings
decide, the real timing of cut models, and an engine that runs the setting auto picks."""
import logging

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import helpers
from asyncllm import LLM
from asyncllm.model.loader import load_checkpoint
from asyncllm.worker import auto_setting
from asyncllm.worker.auto_setting import CpuSetting, SettingTiming

FP32, BF16 = CpuSetting(torch.float32), CpuSetting(torch.bfloat16)


@pytest.mark.parametrize("fp32_s, bf16_s, block_bits, want", [
    (1.0, 5.0, None, [FP32]),  # AVX2-only: bf16 far slower, not worth a whole step
    (1.0, 5.0, 4, [FP32, CpuSetting(torch.float32, 4)]),
    (1.0, 0.5, None, [BF16, FP32]),  # AVX-512-BF16 / AMX: the matmul rule picks bf16 first
    (1.0, 1.2, 8, [FP32, BF16, CpuSetting(torch.float32, 8)]),  # close: both dtypes timed
])
def test_candidates_start_with_the_matmul_rule_and_add_what_may_beat_it(monkeypatch, fp32_s, bf16_s, block_bits,
                                                                        want):
    monkeypatch.setattr(auto_setting, "cpu_matmul_seconds", lambda: (fp32_s, bf16_s))
    assert auto_setting.candidates(block_bits) == want


def test_the_first_setting_stays_unless_another_is_faster_by_the_margin(monkeypatch):
    blocks = CpuSetting(torch.float32, 4)
    # W2 tok/s = 64 / (prompt + 8 * decode): 64 / (0.5 + 8 * 0.05) = 71.1
    timings = {FP32: SettingTiming(FP32, 0.5, 0.05)}
    monkeypatch.setattr(auto_setting, "time_setting", lambda cfg, setting, kernels, prepack: timings[setting])
    cfg = load_checkpoint(None).config
    timings[blocks] = SettingTiming(blocks, 0.5, 0.048)  # 72.7 tok/s: faster, but within the margin
    assert auto_setting.choose(cfg, [FP32, blocks], "cpu", True)[0] == FP32
    timings[blocks] = SettingTiming(blocks, 0.4, 0.03)  # 100 tok/s
    chosen, measured = auto_setting.choose(cfg, [FP32, blocks], "cpu", True)
    assert chosen == blocks and [t.setting for t in measured] == [FP32, blocks]
    assert measured[1].w2_tokens_per_second == pytest.approx(64 / (0.4 + 8 * 0.03))
    assert auto_setting.choose(cfg, [FP32], "cpu", True) == (FP32, [])  # one candidate: nothing timed


@helpers.needs_c_kernels
def test_timing_a_cut_model_of_the_default_shape(caplog):
    """The real measurement: the default model's shape cut to a few layers, each setting's prompt and
    8-row decode steps timed and scaled to 30 layers, and the decision logged with the figures."""
    cfg = load_checkpoint(None).config
    assert 1 <= auto_setting._cut_layers(cfg) < cfg.num_layers
    settings = [FP32, CpuSetting(torch.float32, 4)]
    with caplog.at_level(logging.INFO, logger="asyncllm.worker.auto_setting"):
        chosen, timings = auto_setting.choose(cfg, settings, "cpu", True)
    assert chosen in settings and [t.setting for t in timings] == settings
    for t in timings:  # a 128-token prompt step costs more than one 8-row decode step, and both are real
        assert 0 < t.decode_seconds < t.prompt_seconds < 60
    best = max(timings, key=lambda t: t.w2_tokens_per_second)
    assert chosen == (best.setting if best.w2_tokens_per_second > auto_setting.MARGIN *
                      timings[0].w2_tokens_per_second else FP32)
    assert "W2-shaped steps timed on" in caplog.text and f"-> {chosen}" in caplog.text


def test_exact_block_bits_of_a_checkpoint(tiny_models, default_gguf, tmp_path):
    """A GGUF whose every projection one kind of block holds exactly says which; others say None."""
    assert load_checkpoint(None).exact_block_bits == 4  # the default model: Q4_1 projections, Q8_0 embedding
    for qtype, bits in ((Q.Q8_0, 8), (Q.Q5_0, 8), (Q.F32, None)):
        path = str(tmp_path / f"tiny-{qtype.name}.gguf")
        helpers.write_llama_gguf(helpers.plain_llama(tiny_models), path, default_gguf, qtype, embedding_qtype=Q.Q8_0)
        assert load_checkpoint(path).exact_block_bits == bits, qtype.name
    assert load_checkpoint(tiny_models("LlamaForCausalLM")).exact_block_bits is None  # safetensors


@helpers.needs_c_kernels
def test_auto_on_the_files_blocks_runs_from_them_alone_and_matches_transformers(monkeypatch, tiny_models,
                                                                                  default_gguf, tmp_path):
    """Where auto picks the GGUF's own blocks, the engine keeps only those (as quantization +
    quantized_weights_only would) and gives transformers' greedy ids and logprobs on the file."""
    path = str(tmp_path / "tiny.gguf")
    helpers.write_llama_gguf(helpers.plain_llama(tiny_models), path, default_gguf, Q.Q8_0, embedding_qtype=Q.Q8_0)
    offered = []

    def pick_blocks(model_config, settings, kernels, prepack):
        offered.extend(settings)
        return settings[-1], []

    monkeypatch.setattr(auto_setting, "choose", pick_blocks)
    llm = LLM(path, dtype="auto", kernels="cpu", kv_cache_memory=16 << 20)
    try:
        assert offered[-1] == CpuSetting(torch.float32, 8)
        model = llm.engine.core.executor.worker.runner.model
        assert model.dtype == torch.float32
        assert all(p.dense_dropped and p.quantized.exact and p.quantized.bits == 8 for p in model.projections())
        assert model.logits_only_blocks
        helpers.check_gguf_greedy_matches_transformers(llm, path, helpers.TEXT_PROMPTS[:1])
    finally:
        llm.engine.shutdown()


@helpers.needs_c_kernels
def test_auto_offers_no_blocks_with_adapters_and_times_nothing_for_a_pinned_dtype(monkeypatch, tiny_models,
                                                                                  default_gguf, tmp_path):
    path = str(tmp_path / "tiny.gguf")
    helpers.write_llama_gguf(helpers.plain_llama(tiny_models), path, default_gguf, Q.Q8_0, embedding_qtype=Q.Q8_0)
    offered = []
    monkeypatch.setattr(auto_setting, "choose",
                        lambda cfg, settings, kernels, prepack: (offered.append(settings) or settings[0], []))
    for kwargs in (dict(dtype="auto", enable_lora=True), dict(dtype="float32")):
        llm = LLM(path, kernels="cpu", kv_cache_memory=16 << 20, **kwargs)
        llm.engine.shutdown()
    assert len(offered) == 1 and all(s.block_bits is None for s in offered[0])  # the pinned dtype timed nothing
