"""Decode steps from CUDA graphs (worker/cuda_graphs.py) and the GPU memory profile
(worker/memory_profile.py). Without a GPU the graphs' padded static buffers run eagerly on
Triton's interpreter (everything but the capture); with ASYNCLLM_TEST_DEVICE=cuda (make gpu-check)
the engine captures real graphs at start."""
import os

import pytest
import torch

import helpers
from asyncllm import LLM
from asyncllm.config import EngineArgs, parse_cuda_graph_sizes
from asyncllm.worker.cuda_graphs import default_capture_sizes, graph_unsupported_reason
from asyncllm.worker.memory_profile import dummy_step_shape, kv_cache_budget, run_dummy_step

DEVICE = os.environ.get("ASYNCLLM_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.timeout(600)


def test_capture_sizes_follow_vllm_defaults_and_parse():
    assert default_capture_sizes(128) == [1, 2, 4] + list(range(8, 129, 8))
    assert default_capture_sizes(3) == [1, 2, 3]
    assert default_capture_sizes(12) == [1, 2, 4, 8, 16]  # a full batch has a bucket
    assert default_capture_sizes(4096)[-1] == 512
    assert parse_cuda_graph_sizes("8, 1,4", 128) == [1, 4, 8]
    assert parse_cuda_graph_sizes([2, 2, 16], 128) == [2, 16]
    assert parse_cuda_graph_sizes(None, 16) == [1, 2, 4, 8, 16]
    for bad in ("1,x", "0,4", ""):
        with pytest.raises(ValueError, match="cuda_graph_sizes"):
            EngineArgs(cuda_graph_sizes=bad).create_engine_config()


def test_graphs_are_refused_where_a_step_reads_the_host(tiny_models):
    llm = LLM(tiny_models("MixtralForCausalLM"), dtype="float32", device="cpu", kernels="torch",
              kv_cache_memory=4 << 20)
    try:
        model = llm.engine.core.executor.worker.model
        assert "kernels='torch'" in graph_unsupported_reason(model, "torch", lora=False, draft=False)
        assert "mixture of experts" in graph_unsupported_reason(model, "triton", lora=False, draft=False)
    finally:
        llm.engine.shutdown()
    llm = LLM(tiny_models("LlamaForCausalLM"), dtype="float32", device="cpu", kernels="torch", kv_cache_memory=4 << 20)
    try:
        model = llm.engine.core.executor.worker.model
        assert graph_unsupported_reason(model, "triton", lora=False, draft=False) is None
        assert "LoRA" in graph_unsupported_reason(model, "triton", lora=True, draft=False)
        assert "draft" in graph_unsupported_reason(model, "triton", lora=False, draft=True)
    finally:
        llm.engine.shutdown()


def test_padded_graph_steps_match_transformers(tiny_models):
    """Decode steps of 1-4 requests padded to the sizes 2 and 8 (padding rows write no K/V and are
    dropped): greedy ids equal transformers', logprobs close, with prompt chunks sharing steps."""
    path = tiny_models("LlamaForCausalLM")
    llm = LLM(path, dtype="float32", device=DEVICE, kernels="triton", kv_cache_memory=16 << 20,
              max_num_batched_tokens=20, cuda_graph_sizes="2,8")
    try:
        runner = llm.engine.core.executor.worker.runner
        if DEVICE == "cpu":
            assert runner.decode_graphs is None  # graphs are captured on CUDA only
            runner.enable_decode_graphs(parse_cuda_graph_sizes("2,8", 128), capture=False)
        graphs = runner.decode_graphs
        assert graphs.sizes == [2, 8] and graphs.bucket(1) == 2 and graphs.bucket(3) == 8 and graphs.bucket(9) is None
        helpers.check_mixed_steps_match_transformers(llm, helpers.load_hf(path), max_tokens=16)
        assert graphs.replays > 0
    finally:
        llm.engine.shutdown()


def test_enforce_eager_keeps_graphs_off(tiny_models):
    llm = LLM(tiny_models("LlamaForCausalLM"), dtype="float32", device=DEVICE, kernels="triton",
              kv_cache_memory=4 << 20, enforce_eager=True)
    try:
        assert llm.engine.core.executor.worker.runner.decode_graphs is None
    finally:
        llm.engine.shutdown()


def test_dummy_step_shape_splits_into_whole_sequences():
    shape = dummy_step_shape(1024, 300, 16)
    assert shape.sequence_lengths == [300, 300, 300, 124] and shape.tokens == 1024
    assert shape.blocks == 3 * 19 + 8
    assert dummy_step_shape(8, 2048, 16).sequence_lengths == [8]
    with pytest.raises(ValueError):
        dummy_step_shape(0, 16, 16)


def test_dummy_step_runs_in_a_cache_of_its_own(tiny_models):
    """The profiled step computes what a real prompt of the same tokens computes, into its own
    throw-away cache: the engine's cache is untouched."""
    from asyncllm import SamplingParams

    llm = LLM(tiny_models("LlamaForCausalLM"), dtype="float32", device="cpu", kernels="torch", kv_cache_memory=4 << 20)
    try:
        worker = llm.engine.core.executor.worker
        cache_before = [c.clone() for c in worker.runner.kv_caches]
        shape = dummy_step_shape(40, 16, worker.spec.block_size)  # 16 + 16 + 8 tokens
        logits = run_dummy_step(worker.model, worker.spec, shape, 3, torch.device("cpu"))
        assert logits.shape == (3, worker.model.config.vocab_size) and torch.isfinite(logits).all()
        assert all(torch.equal(a, b) for a, b in zip(cache_before, worker.runner.kv_caches))
        # The last sequence is 8 zeros from position 0: its last row's logits are those of that prompt.
        out = llm.generate([{"prompt_token_ids": [0] * 8}], SamplingParams(max_tokens=1, temperature=0, logprobs=1),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids[0] == int(logits[-1].argmax())
        assert abs(out.logprobs[0][out.token_ids[0]].logprob - float(logits[-1].log_softmax(-1).max())) < 1e-4
    finally:
        llm.engine.shutdown()


def test_kv_cache_budget_takes_the_share_less_use_and_peak():
    gib = 2**30
    assert kv_cache_budget(total=80 * gib, free=70 * gib, utilization=0.9, activation_peak=2 * gib) == \
        int(80 * gib * 0.9) - 10 * gib - 2 * gib
    with pytest.raises(ValueError, match="raise gpu_memory_utilization or lower max_num_batched_tokens"):
        kv_cache_budget(total=80 * gib, free=10 * gib, utilization=0.9, activation_peak=2 * gib)


def test_step_inputs_go_over_in_one_packed_copy():
    from asyncllm.worker.staging import HostToDeviceStaging

    staging = HostToDeviceStaging(torch.device("cpu"), pack=True)
    first = [torch.arange(5), torch.tensor([[3, 4, 5], [6, 7, 8]], dtype=torch.int32), torch.tensor([9])]
    got = staging.to_device(*first)
    second = staging.to_device(torch.arange(100, 140).view(4, 10))  # reuses and grows the buffer
    assert [g.dtype for g in got] == [torch.long] * 3 and [g.shape for g in got] == [t.shape for t in first]
    assert all(torch.equal(g, t.long()) for g, t in zip(got, first))  # not overwritten by the next call
    assert torch.equal(second[0], torch.arange(100, 140).view(4, 10)) and staging.copies == 2
    assert HostToDeviceStaging(torch.device("cpu")).pack is False  # the CPU engine copies nothing


def test_packed_step_inputs_give_the_same_tokens(tiny_models):
    """The runner's inputs through the packed copy (what CUDA steps take) give the plain engine's tokens."""
    from asyncllm import SamplingParams
    from asyncllm.worker.staging import HostToDeviceStaging

    path = tiny_models("LlamaForCausalLM")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": list(range(3 + i, 30 + 2 * i))} for i in range(3)]
    outs = []
    for pack in (False, True):
        llm = LLM(path, dtype="float32", device="cpu", kernels="torch", kv_cache_memory=4 << 20,
                  max_num_batched_tokens=32)
        try:
            runner = llm.engine.core.executor.worker.runner
            runner.staging = HostToDeviceStaging(torch.device("cpu"), pack=pack)
            outs.append(llm.generate(prompts, params, use_tqdm=False))
            assert (runner.staging.copies > 0) == pack
        finally:
            llm.engine.shutdown()
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].logprobs == b.outputs[0].logprobs
