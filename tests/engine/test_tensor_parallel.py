"""Tensor parallelism over 2 CPU processes (torch.distributed with gloo, and the shared-memory
collectives of one host): column-parallel QKV and
gate/up, row-parallel o/down with an all-reduce, the vocabulary split (embedding all-reduce,
logits gathered), and for mixture-of-experts models each rank's whole experts (expert parallel,
their shares all-reduced): greedy ids equal to transformers, logprobs close, as on one rank."""
import os
import signal
import time

import pytest

import helpers
from asyncllm import LLM, EngineDeadError, SamplingParams
from server_helpers import pid_alive

pytestmark = pytest.mark.timeout(300)


_alive = pid_alive


@pytest.mark.parametrize("arch,collectives", [("LlamaForCausalLM", "shm"), ("LlamaForCausalLM", "gloo"),
                                              ("Qwen2ForCausalLM", "shm"), ("Qwen3ForCausalLM", "shm"),
                                              ("Gemma3ForCausalLM", "shm"), ("MixtralForCausalLM", "shm"),
                                              ("Qwen2MoeForCausalLM", "shm"), ("Qwen3MoeForCausalLM", "shm")])
def test_two_ranks_match_transformers(arch, collectives, tiny_models, monkeypatch):
    """With the shared-memory collectives (the default on x86-64) and with gloo's alone."""
    if collectives == "gloo":
        monkeypatch.setenv("ASYNCLLM_SHM_COLLECTIVES", "0")  # the worker processes inherit it
    # Chunked prompts sharing steps with decodes and a prefix-cache hit, on both ranks at once.
    helpers.check_split_matches_transformers(tiny_models(arch), 2, kv_cache_memory=32 << 20, tensor_parallel_size=2)


def test_one_kv_head_is_replicated_on_both_ranks(tmp_path, tokenizer_dir):
    """Fewer KV heads than ranks (Gemma 3 270M has 1): each rank keeps the KV head its query heads read."""
    helpers.save_llama_variant(tmp_path, tokenizer_dir, seed=7, num_key_value_heads=1)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2,
              max_num_batched_tokens=20)
    try:
        helpers.check_mixed_steps_match_transformers(llm, helpers.load_hf(str(tmp_path)), max_tokens=12)
    finally:
        llm.engine.shutdown()


def test_what_does_not_split_is_refused_with_a_message(tiny_models):
    with pytest.raises(ValueError, match="tensor_parallel_size=3: a number of heads of 4 does not split"):
        LLM(tiny_models("LlamaForCausalLM"), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="a number of experts of 6 does not split over 4 ranks"):
        LLM(tiny_models("Qwen3MoeForCausalLM"), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="enable_lora is not supported with tensor_parallel_size > 1"):
        LLM(tiny_models("LlamaForCausalLM"), tensor_parallel_size=2, enable_lora=True)
    with pytest.raises(ValueError, match="distributed_executor_backend must be mp"):
        LLM(tiny_models("LlamaForCausalLM"), tensor_parallel_size=2, distributed_executor_backend="uni")


def test_a_dead_rank_stops_the_other_and_the_engine(tiny_models):
    helpers.check_a_killed_process_stops_the_others(tiny_models("LlamaForCausalLM"), 1, tensor_parallel_size=2)


def test_a_hung_rank_fails_the_engine_within_the_step_timeout(tiny_models):
    """SIGSTOP: the rank neither dies nor answers; the step time-out stops every rank."""
    llm = LLM(tiny_models("LlamaForCausalLM"), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2,
              execute_model_timeout=3.0)
    executor = llm.engine.core.executor
    try:
        assert llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
        os.kill(executor.processes[1].pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="hung"):
            llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while any(_alive(p.pid) for p in executor.processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p.pid) for p in executor.processes)
    finally:
        llm.engine.shutdown()


def test_serve_with_tp_2_gives_the_one_rank_answers(tiny_models):
    """`asyncllm serve MODEL -tp 2` behind the real openai client: the same greedy text as in process at TP=1."""
    helpers.check_serve_gives_one_process_texts(tiny_models("Qwen3ForCausalLM"), ["-tp", "2"])
