"""Greedy token ids equal to transformers on the same weights; logprobs close.

Every supported architecture as a tiny random model saved with save_pretrained, and
the default model (GGUF) against transformers loading the same GGUF file.
"""
import pytest

import helpers
from asyncllm import LLM, SamplingParams


@pytest.mark.parametrize("arch", helpers.ARCHITECTURES)
def test_tiny_model_matches_transformers(arch, tiny_models):
    path = tiny_models(arch)
    hf = helpers.load_hf(path)
    llm = LLM(path, dtype="float32", kv_cache_memory=64 << 20)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in helpers.TEXT_PROMPTS[:5]]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        hf_tokens, hf_logits = helpers.hf_greedy(hf, prompt, 32)
        completion = out.outputs[0]
        assert completion.token_ids == hf_tokens
        assert completion.finish_reason == "length"
        helpers.check_logprobs(completion, hf_logits)


def test_mistral_sliding_window_is_exercised(tiny_models):
    """The tiny Mistral's window (24) is shorter than prompt + 32 tokens, so the mask matters."""
    llm = LLM(tiny_models("MistralForCausalLM"), dtype="float32", kv_cache_memory=16 << 20)
    assert llm.engine.core.checkpoint.config.sliding_window == 24


def test_phi3_checkpoint_is_fused_and_its_context_is_the_long_one(tiny_models):
    """Phi-3 stores qkv_proj and gate_up_proj fused (split at load); with LongRoPE's long factors the
    context is max_position_embeddings (test_phi3_long_context.py runs past the original one), without
    them the original context, and a longer max_model_len is refused."""
    import os

    from safetensors import safe_open
    from transformers import AutoConfig

    from asyncllm.model.arch_config import LlamaFamilyConfig

    path = tiny_models("Phi3ForCausalLM")
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    assert llm.engine.max_model_len == 512 and llm.engine.core.checkpoint.config.rope.attention_factor > 1.2
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        LLM(path, dtype="float32", kv_cache_memory=16 << 20, max_model_len=1024)
    config = AutoConfig.from_pretrained(path)
    short_only = {k: v for k, v in config.rope_parameters.items() if k != "long_factor"}
    config.rope_parameters = short_only
    assert LlamaFamilyConfig.from_hf(config, "Phi3ForCausalLM").max_position_embeddings == 64
    config.rope_parameters = {**short_only, "partial_rotary_factor": 0.75}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LlamaFamilyConfig.from_hf(config, "Phi3ForCausalLM")


@pytest.fixture(scope="module")
def default_reference(default_gguf, default_llm):
    """transformers' greedy 64-token answers to 8 chat prompts, on the same GGUF weights."""
    hf = helpers.load_hf(None, gguf_file=default_gguf)
    tok = default_llm.get_tokenizer()
    refs = []
    for question in helpers.CHAT_QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        new, logits = helpers.hf_greedy(hf, ids, 64)
        refs.append((question, ids, new, logits))
    return refs


def test_default_model_chat_matches_transformers(default_llm, default_reference):
    conversations = [[{"role": "user", "content": q}] for q, *_ in default_reference]
    params = SamplingParams(max_tokens=64, temperature=0, logprobs=3)
    outputs = default_llm.chat(conversations, params, use_tqdm=False)
    for (question, ids, hf_tokens, hf_logits), out in zip(default_reference, outputs):
        assert out.prompt_token_ids == ids
        completion = out.outputs[0]
        assert completion.token_ids == hf_tokens, question
        helpers.check_logprobs(completion, hf_logits)
        assert completion.text == default_llm.get_tokenizer().decode(hf_tokens, skip_special_tokens=True)


def test_mixed_prefill_and_decode_batch_equals_alone(default_reference):
    """Requests arrive while others decode; prompts are chunked (20-token budget) across steps."""
    llm = LLM(dtype="float32", max_num_batched_tokens=20, enable_prefix_caching=False)
    engine = llm.engine
    steps = []
    schedule = engine.core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        requests = engine.core.scheduler.requests
        steps.append([(s.num_new_tokens, s.samples, s.start >= requests[s.req_id].num_prompt_tokens)
                      for s in out.scheduled])
        return out

    engine.core.scheduler.schedule = recording_schedule
    params = SamplingParams(max_tokens=24, temperature=0)
    finals = {}
    pending = list(enumerate(default_reference))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, (_, ids, _, _) = pending.pop(0)
            engine.add_request(f"mixed-{i}", {"prompt_token_ids": ids}, params)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    # Some step ran a decode together with a prompt chunk that did not finish its prompt.
    assert any(any(decode for _, _, decode in step) and any(not samples for _, samples, _ in step) for step in steps)
    for i, (_, ids, hf_tokens, _) in enumerate(default_reference):
        assert finals[f"mixed-{i}"].outputs[0].token_ids == hf_tokens[:24]


@pytest.mark.parametrize("arch", helpers.MOE_ARCHITECTURES)
def test_moe_batch_equals_each_request_alone(arch, tiny_models):
    """Tokens routed to different experts in one step (grouped per expert) give what each request
    gets alone; and the router really spreads tokens over experts."""
    llm = LLM(tiny_models(arch), dtype="float32", kv_cache_memory=32 << 20)
    model = llm.engine.core.executor.worker.model
    block = next(layer.mlp for layer in model.layers if hasattr(layer.mlp, "experts"))
    assert float(block.experts[0].gate_up_proj.dense_weight().std()) > 0.05
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(p)} for p in helpers.TEXT_PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    together = llm.generate(prompts, params, use_tqdm=False)
    for prompt, batched in zip(prompts, together):
        alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert batched.outputs[0].token_ids == alone.token_ids
        for got, want in zip(batched.outputs[0].logprobs, alone.logprobs):
            assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in want)
    import torch

    from asyncllm.model.layers.moe import route

    hidden = torch.randn(64, model.config.hidden_size)
    _, ids = route(block.gate(hidden), block.top_k, block.normalize)
    assert len(ids.unique()) == model.config.moe.num_experts
    with pytest.raises(ValueError, match="not supported for mixture-of-experts"):
        LLM(tiny_models(arch), dtype="float32", enable_lora=True, kv_cache_memory=16 << 20)


def test_gemma2_soft_capping_is_exercised_and_refused_where_not_built(tiny_models):
    """The tiny Gemma 2's caps bend its scores (the parity above holds with them); the Triton
    kernels have no cap, so asking for them is a clear error rather than uncapped attention."""
    path = tiny_models("Gemma2ForCausalLM")
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    config = llm.engine.core.checkpoint.config
    assert config.attention_softcapping == 2.0 and config.final_logit_softcapping == 3.0
    assert config.layer_sliding_window(1) is None and config.layer_sliding_window(0) == 12
    import torch

    model = llm.engine.core.executor.worker.model
    with torch.no_grad():
        logits = model.compute_logits(torch.randn(4, config.hidden_size) * 50)
    assert float(logits.abs().max()) <= 3.0 and float(logits.abs().max()) > 2.5  # the final cap holds
    with pytest.raises(ValueError, match="soft-capping"):
        LLM(path, dtype="float32", kernels="triton", kv_cache_memory=16 << 20)
