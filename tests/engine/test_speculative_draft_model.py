"""Speculative decoding with a draft model (method "draft_model"): the draft runs in the worker with
its own paged K/V in the target's blocks, proposes k greedy tokens per request per step, and one
target forward verifies them: the tokens are the target's alone (greedy against transformers, with
chunked prompts, prefix-cache hits and preemption; seeded sampling as without speculation)."""
import os
import shutil

import pytest

import helpers
from asyncllm import LLM, SamplingParams

pytestmark = pytest.mark.timeout(300)

ARGS = dict(dtype="float32", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def other_tiny_llama(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny Llama with other random weights (and one layer) but the same tokenizer: a poor draft."""
    return helpers.save_llama_variant(tmp_path_factory.mktemp("draft"), tokenizer_dir, seed=99, num_hidden_layers=1)


def _draft(model: str, k: int = 3, **extra) -> dict:
    # Proposals at any batch size: these tests check the verification itself.
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k, "disable_by_batch_size": None,
            **extra}


@pytest.mark.parametrize("draft", ["itself", "other"])
def test_draft_model_gives_the_targets_greedy_tokens(draft, tiny_models, other_tiny_llama):
    path = tiny_models("LlamaForCausalLM")
    model = path if draft == "itself" else other_tiny_llama
    llm = LLM(path, speculative_config=_draft(model), max_num_batched_tokens=20, **ARGS)
    core = llm.engine.core
    try:
        helpers.check_mixed_steps_match_transformers(llm, helpers.load_hf(path))
        assert core.num_draft_tokens > 0
        rate = core.num_accepted_tokens / core.num_draft_tokens
        if draft == "itself":  # the same weights propose what the target samples
            assert rate > 0.95, rate
    finally:
        llm.engine.shutdown()


def test_draft_blocks_share_the_budget_and_preemption_keeps_the_tokens(tiny_models, other_tiny_llama):
    """The draft's K/V takes its share of each block (fewer blocks in the same memory); with a cache
    so small that requests are preempted and recomputed, the tokens stay plain decoding's."""
    path = tiny_models("Qwen3ForCausalLM")
    plain = LLM(path, **ARGS)
    target_bytes = plain.engine.core.executor.worker.spec.bytes_per_block
    prompts = [{"prompt_token_ids": list(range(100 + 7 * i, 160 + 7 * i))} for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    try:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    finally:
        plain.engine.shutdown()
    small = LLM(path, speculative_config=_draft(other_tiny_llama), dtype="float32",
                kv_cache_memory=30 * target_bytes, max_num_seqs=6)
    try:
        worker = small.engine.core.executor.worker
        draft_bytes = worker.draft_spec.bytes_per_block
        assert draft_bytes > 0 and worker.spec.bytes_per_block == target_bytes
        # 30 blocks' worth of the target's K/V hold fewer blocks of both.
        assert small.engine.core.load_report.num_blocks == 30 * target_bytes // (target_bytes + draft_bytes) < 30
        got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
        assert small.engine.core.scheduler.num_preemptions > 0
    finally:
        small.engine.shutdown()
    assert got == want


def test_seeded_sampling_with_a_draft_is_sampling_without_one(tiny_models):
    """The rejected rows' random draws are undone, so a seeded request samples the same tokens."""
    path = tiny_models("LlamaForCausalLM")
    prompts = [{"prompt_token_ids": list(range(300 + 5 * i, 330 + 5 * i))} for i in range(3)]
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=8, seed=7, ignore_eos=True)
    outs = []
    for spec in (None, _draft(path)):
        llm = LLM(path, speculative_config=spec, **ARGS)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            if spec is not None:
                assert llm.engine.core.num_accepted_tokens > 0
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]


def test_a_draft_with_another_vocabulary_is_refused(tiny_models, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**helpers.TINY_COMMON, "vocab_size": 1000}, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), tmp_path)
    with pytest.raises(Exception, match="must be a decoder with the target's tokenizer"):
        LLM(tiny_models("LlamaForCausalLM"), speculative_config=_draft(str(tmp_path)), **ARGS)
    with pytest.raises(ValueError, match="'draft_model' runs with tensor_parallel_size and pipeline_parallel_size 1"):
        LLM(tiny_models("LlamaForCausalLM"), speculative_config=_draft(str(tmp_path)), tensor_parallel_size=2)


def test_proposals_stop_short_of_max_model_len(tiny_models):
    """Up to the context's end (the draft never writes past it), the tokens of plain decoding."""
    path = tiny_models("LlamaForCausalLM")
    prompts = [{"prompt_token_ids": list(range(500 + i, 530 + i))} for i in range(3)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = []
    for spec in (None, _draft(path, k=7)):
        llm = LLM(path, speculative_config=spec, max_model_len=48, **ARGS)
        try:
            outs.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                         for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1] and all(len(t) == 18 and r == "length" for t, r in outs[1])
