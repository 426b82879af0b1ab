"""Multi-LoRA against transformers + PEFT on the same weights: adapters made here with `peft`
(random A, nonzero random B; several ranks, targets, alphas, rsLoRA) on tiny random models
and the default model. Greedy tokens equal PEFT's (unmerged and merged), logprobs close; a
batch mixing adapters and the base model equals each request alone; the prefix cache never
shares KV across adapters; bad adapters are refused with why."""
import contextlib
import json
import os

import pytest
import torch

import helpers
from asyncllm import LLM, InvalidRequestError, LoRARequest, SamplingParams

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, rank, targets, alpha, rsLoRA)
ADAPTERS = [
    ("all8", 8, ALL, 16.0, False),
    ("qv4", 4, ["q_proj", "v_proj"], 8.0, True),
    ("mlp16", 16, ["gate_proj", "up_proj", "down_proj"], 8.0, False),
    ("attn2", 2, ["k_proj", "o_proj"], 4.0, False),
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module", params=["Qwen2ForCausalLM", "LlamaForCausalLM"])
def tiny_lora(request, tiny_models, tmp_path_factory):
    """(engine with 4 adapter slots, {name: (LoRARequest, PEFT model)}, prompts, base model path)."""
    path = tiny_models(request.param)
    root = tmp_path_factory.mktemp("adapters")
    adapters = {}
    for i, (name, rank, targets, alpha, rslora) in enumerate(ADAPTERS):
        folder = str(root / name)
        peft_model = helpers.save_lora_adapter(helpers.load_hf(path), folder, rank, targets, seed=10 + i,
                                               alpha=alpha, use_rslora=rslora)
        adapters[name] = (LoRARequest(name, i + 1, folder), peft_model)
    llm = LLM(path, dtype="float32", kv_cache_memory=64 << 20, enable_lora=True, max_loras=4)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in helpers.TEXT_PROMPTS[:4]]
    return llm, adapters, prompts, path


def _run(llm, prompts, loras, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)


def test_each_adapter_matches_peft_unmerged_and_merged(tiny_lora):
    llm, adapters, prompts, _ = tiny_lora
    for name, (lora, peft_model) in adapters.items():
        outputs = _run(llm, prompts[:2], lora)
        merged = peft_model.merge_and_unload() if name == "all8" else None  # merging changes the model: once
        for prompt, out in zip(prompts[:2], outputs):
            reference, logits = helpers.hf_greedy(peft_model if merged is None else merged, prompt, 24)
            assert out.outputs[0].token_ids == reference, name
            helpers.check_logprobs(out.outputs[0], logits)


def test_mixed_batch_equals_each_request_alone(tiny_lora):
    """8 requests over 4 adapters and the base model in one batch (one forward per step)."""
    llm, adapters, prompts, _ = tiny_lora
    loras = [adapters[name][0] for name, *_ in ADAPTERS]
    plan = [(prompts[i % 4], [loras[0], loras[1], None, loras[2], loras[3], loras[0], None, loras[1]][i])
            for i in range(8)]
    together = _run(llm, [p for p, _ in plan], [lora for _, lora in plan])
    for (prompt, lora), out in zip(plan, together):
        alone = _run(llm, [prompt], lora)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        for a, b in zip(out.outputs[0].logprobs, alone.outputs[0].logprobs):
            token = next(iter(b))
            assert abs(a[token].logprob - b[token].logprob) < 1e-4
    base = _run(llm, [prompts[0]], None)[0]
    assert together[0].outputs[0].token_ids != base.outputs[0].token_ids  # the adapter changed something


@contextlib.contextmanager
def _torch_products(model):
    """The per-op forward with LoRA products as torch matmuls (no C decoder, no C or Triton kernel)."""
    projections = [m.lora for m in model.modules() if getattr(m, "lora", None) is not None]
    kernels = [p.kernels for p in projections]
    model.use_decode_stack = False
    for p in projections:
        p.kernels = "torch"
    try:
        yield
    finally:
        model.use_decode_stack = True
        for p, kind in zip(projections, kernels):
            p.kernels = kind


def _assert_same_run(got, want, tolerance):
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            token = next(iter(b))
            assert abs(a[token].logprob - b[token].logprob) < tolerance


def test_c_kernels_equal_the_torch_products(tiny_lora):
    """Decode steps of up to 8 rows add the LoRA products inside the one-call C decoder
    (decode_stack_impl.h, lora_for), and the per-op path's steps of up to 8 rows through the C
    lora_rows; the torch matmuls are the reference for both."""
    llm, adapters, prompts, _ = tiny_lora
    model = llm.engine.core.executor.worker.runner.model
    loras = [adapters[name][0] for name, *_ in ADAPTERS] + [None]
    plan = [prompts[i % 4] for i in range(5)]

    def lora_steps() -> int:  # the stack is built on the first decode step it takes
        return 0 if model.decode_stack is None else model.decode_stack.lora_steps

    steps = lora_steps()
    c_stack = _run(llm, plan, loras)
    assert lora_steps() > steps  # the C decoder ran these steps
    model.use_decode_stack = False
    try:
        c_rows = _run(llm, plan, loras)
    finally:
        model.use_decode_stack = True
    with _torch_products(model):
        torch_path = _run(llm, plan, loras)
    _assert_same_run(c_stack, torch_path, 1e-4)
    _assert_same_run(c_rows, torch_path, 1e-4)


def test_triton_kernels_equal_the_c_engine(tiny_lora, monkeypatch):
    """kernels="triton" (Triton's interpreter without a GPU; ASYNCLLM_TEST_DEVICE=cuda compiled):
    decode steps' LoRA products go through asyncllm_kernels.lora_bgmv, one launch for every
    adapter; the answers equal the C engine's (itself equal to PEFT above)."""
    import asyncllm_kernels

    calls = []
    kernel = asyncllm_kernels.lora_bgmv
    monkeypatch.setattr(asyncllm_kernels, "lora_bgmv", lambda x, *rest: calls.append(x.shape[0]) or kernel(x, *rest))
    llm, adapters, prompts, path = tiny_lora
    triton_llm = LLM(path, dtype="float32", device=os.environ.get("ASYNCLLM_TEST_DEVICE", "cpu"), kernels="triton",
                     kv_cache_memory=16 << 20, enable_lora=True, max_loras=4)
    loras = [adapters[name][0] for name, *_ in ADAPTERS] + [None]
    plan = [prompts[i % 4] for i in range(5)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    _assert_same_run(_run(triton_llm, plan, loras, params), _run(llm, plan, loras, params), 1e-4)
    assert 5 in calls  # the five-row decode steps: mixed adapters (and the base model) in one launch


def test_bf16_adapters_close_to_fp32(tiny_models, tiny_lora, monkeypatch):
    """A bf16 engine (what dtype="auto" picks on AVX-512-BF16 CPUs) runs decode steps of 1-8 rows on
    the one-call C decoder (its LoRA products in fp32 from bf16 activations), or per op with
    lora_rows, and torch's bf16 matmuls for bigger steps; all stay within bf16's error of the fp32
    engine on every adapter, while their tokens agree."""
    from asyncllm.kernels import cpu as cpu_kernels

    calls = []
    kernel = cpu_kernels.LoRARows.__call__
    monkeypatch.setattr(cpu_kernels.LoRARows, "__call__",
                        lambda self, x, *rest: calls.append(x.dtype) or kernel(self, x, *rest))
    llm32, adapters, prompts, path = tiny_lora
    llm16 = LLM(path, dtype="bfloat16", kv_cache_memory=32 << 20, enable_lora=True, max_loras=4)
    model = llm16.engine.core.executor.worker.runner.model
    loras = [adapters[name][0] for name, *_ in ADAPTERS] * 2
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
    plan = [prompts[i % 4] for i in range(8)]
    want = _run(llm32, plan, loras, params)
    got_stack = _run(llm16, plan, loras, params)
    # The decode steps' products: in the C decoder, which reads bf16 panels (none on AMX CPUs:
    # there the per-op path and lora_rows serve).
    stack = cpu_kernels.bf16_kernels_serve()
    assert (model.decode_stack.lora_steps > 0) == stack and bool(calls) != stack
    model.use_decode_stack = False
    got_c = _run(llm16, plan, loras, params)
    model.use_decode_stack = True
    assert calls and set(calls) == {torch.bfloat16}  # per op: lora_rows
    with _torch_products(model):
        got_torch = _run(llm16, plan, loras, params)
    compared = 0
    for w, s, c, t in zip(want, got_stack, got_c, got_torch):
        for got in (s, c, t):
            for position, (token, reference) in enumerate(zip(w.outputs[0].token_ids, w.outputs[0].logprobs)):
                top = got.outputs[0].logprobs[position]
                for candidate, logprob in top.items():
                    if candidate in reference:
                        assert abs(logprob.logprob - reference[candidate].logprob) < 0.1
                        compared += 1
                if got.outputs[0].token_ids[position] != token:
                    break  # a near tie resolved the other way: later positions see other tokens
    assert compared > 150


def test_more_adapters_than_slots_wait_their_turn(tiny_models, tiny_lora):
    """max_loras=2 with 4 adapters in one call: the scheduler runs two at a time, the worker
    evicts the least recently used, and every answer equals the 4-slot engine's."""
    llm4, adapters, prompts, path = tiny_lora
    llm2 = LLM(path, dtype="float32", kv_cache_memory=64 << 20, enable_lora=True, max_loras=2, max_cpu_loras=2)
    loras = [adapters[name][0] for name, *_ in ADAPTERS] * 2
    few = _run(llm2, [prompts[i % 4] for i in range(8)], loras)
    many = _run(llm4, [prompts[i % 4] for i in range(8)], loras)
    assert [o.outputs[0].token_ids for o in few] == [o.outputs[0].token_ids for o in many]
    manager = llm2.engine.core.executor.worker.runner.lora
    assert len(manager.load_seconds) == 4  # the scheduler ran each adapter's requests together
    again = _run(llm2, [prompts[0]], loras[0])[0]  # evicted from the 2-entry host cache: read again
    assert len(manager.load_seconds) == 5 and again.outputs[0].token_ids == many[0].outputs[0].token_ids


def test_prefix_cache_is_keyed_by_adapter(tiny_lora):
    llm, adapters, prompts, _ = tiny_lora
    prompt = (prompts[0] + prompts[1]) * 6  # several whole blocks
    params = SamplingParams(max_tokens=2, temperature=0)
    llm.reset_prefix_cache()
    first = _run(llm, [prompt], adapters["all8"][0], params)[0]
    same = _run(llm, [prompt], adapters["all8"][0], params)[0]
    other = _run(llm, [prompt], adapters["qv4"][0], params)[0]
    base = _run(llm, [prompt], None, params)[0]
    assert first.num_cached_tokens == 0 and same.num_cached_tokens > 0
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0


def test_mp_worker_runs_adapters(tiny_lora):
    """LoRARequest crosses to a worker process (msgpack) and gives the in-thread engine's tokens."""
    llm, adapters, prompts, path = tiny_lora
    mp = LLM(path, dtype="float32", kv_cache_memory=64 << 20, enable_lora=True, max_loras=2,
             distributed_executor_backend="mp")
    try:
        loras = [adapters["all8"][0], None, adapters["mlp16"][0]]
        got = _run(mp, prompts[:3], loras)
        want = _run(llm, prompts[:3], loras)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    finally:
        mp.engine.shutdown()


def _folder(tmp_path, base_path, name, **config_changes):
    folder = tmp_path / name
    helpers.save_lora_adapter(helpers.load_hf(base_path), str(folder), 4, ["q_proj"], seed=3)
    if config_changes:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(config_changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def test_bad_adapters_are_refused_with_why(tiny_lora, tmp_path):
    llm, adapters, prompts, path = tiny_lora
    prompt = [{"prompt_token_ids": prompts[0]}]

    def refused(lora, match):
        with pytest.raises(InvalidRequestError, match=match) as info:
            llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)
        assert info.value.param == "lora_request"

    refused(LoRARequest("x", 90, str(tmp_path / "missing")), "does not exist")
    refused(LoRARequest("x", 91, _folder(tmp_path, path, "big", r=32)), "max_lora_rank 16")
    refused(LoRARequest("x", 92, _folder(tmp_path, path, "dora", use_dora=True)), "use_dora")
    refused(LoRARequest("x", 93, _folder(tmp_path, path, "head", modules_to_save=["lm_head"])), "modules_to_save")
    pickled = _folder(tmp_path, path, "pickled")
    os.rename(os.path.join(pickled, "adapter_model.safetensors"), os.path.join(pickled, "adapter_model.bin"))
    refused(LoRARequest("x", 94, pickled), "pickle")
    refused(LoRARequest("x", 0, adapters["qv4"][0].lora_path), "lora_int_id must be an integer >= 1")
    llm.engine.add_lora(adapters["all8"][0])  # registered (a no-op when an earlier test used it)
    refused(LoRARequest("again", adapters["all8"][0].lora_int_id, adapters["qv4"][0].lora_path), "already names")
    # An embedding adapter: a target this engine does not take.
    embed = tmp_path / "embed"
    helpers.save_lora_adapter(helpers.load_hf(path), str(embed), 4, ["embed_tokens"], seed=4)
    refused(LoRARequest("x", 95, str(embed)), "targets")
    assert not llm.engine.has_unfinished_requests()


def test_lora_needs_enable_lora(tiny_models, tiny_lora):
    _, adapters, prompts, path = tiny_lora
    plain = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    with pytest.raises(InvalidRequestError, match="enable_lora"):
        plain.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False,
                       lora_request=adapters["all8"][0])


def test_default_model_adapter_matches_peft(default_gguf, tmp_path):
    """Rank 16 over every projection of the 135M default model: PEFT on transformers' load of
    the same GGUF is the reference."""
    hf = helpers.load_hf(None, gguf_file=default_gguf)
    peft_model = helpers.save_lora_adapter(hf, str(tmp_path / "adapter"), 16, ALL, seed=7, alpha=32.0, b_std=0.02)
    llm = LLM(dtype="float32", enable_lora=True, max_loras=1, max_num_seqs=8)
    lora = LoRARequest("default16", 1, str(tmp_path / "adapter"))
    conversations = [[{"role": "user", "content": q}] for q in helpers.CHAT_QUESTIONS[:3]]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=3)
    outputs = llm.chat(conversations, params, use_tqdm=False, lora_request=lora)
    plain = llm.chat(conversations[:1], params, use_tqdm=False)[0]
    for out in outputs:
        reference, logits = helpers.hf_greedy(peft_model, out.prompt_token_ids, 24)
        got = out.outputs[0].token_ids
        assert got == reference[:len(got)]  # EOS may end ours first (hf_greedy stops there too)
        helpers.check_logprobs(out.outputs[0], logits)
    assert outputs[0].outputs[0].token_ids != plain.outputs[0].token_ids
    assert torch.tensor(llm.engine.core.executor.worker.runner.lora.load_seconds).max() < 1.0


def test_gemma3_adapter_matches_peft(tiny_models, tmp_path):
    """Gemma 3's layer (four norms, GELU MLP, sliding layers) under an adapter on every projection."""
    path = tiny_models("Gemma3ForCausalLM")
    folder = str(tmp_path / "gemma-all8")
    peft_model = helpers.save_lora_adapter(helpers.load_hf(path), folder, 8, ALL, seed=31, alpha=16.0)
    llm = LLM(path, dtype="float32", kv_cache_memory=32 << 20, enable_lora=True, max_loras=1)
    try:
        tok = llm.get_tokenizer()
        prompts = [tok.encode(p) for p in helpers.TEXT_PROMPTS[:2]]
        base = _run(llm, prompts, None)
        for prompt, out, plain in zip(prompts, _run(llm, prompts, LoRARequest("gemma-all8", 1, folder)), base):
            reference, logits = helpers.hf_greedy(peft_model, prompt, 24)
            assert out.outputs[0].token_ids == reference
            helpers.check_logprobs(out.outputs[0], logits)
            assert out.outputs[0].logprobs != plain.outputs[0].logprobs  # the adapter changes the model
    finally:
        llm.engine.shutdown()
