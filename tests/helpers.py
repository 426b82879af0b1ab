"""Shared test helpers: tiny random models of each architecture, transformers references."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

def _c_kernels_build() -> bool:
    from asyncllm.kernels import cpu as cpu_kernels

    return cpu_kernels.build_error() is None


# What exists only with the C kernels (their block layouts): skipped where gcc cannot build them.
needs_c_kernels = pytest.mark.skipif(not _c_kernels_build(), reason="the C kernels do not build here")


def _bf16_c_kernels_serve() -> bool:
    from asyncllm.kernels import cpu as cpu_kernels

    return cpu_kernels.bf16_kernels_serve()


# What bf16 has only where the C kernels' bf16 panels and prompt attention serve it (batch
# invariance, the one-call decoder): not on AMX CPUs, where bf16 keeps oneDNN's tiles and SDPA.
needs_bf16_c_kernels = pytest.mark.skipif(not _bf16_c_kernels_serve(),
                                          reason="on AMX CPUs bf16 keeps oneDNN's tiles and SDPA: no bf16 panels")

TINY_COMMON = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-6,
    bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
)

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                 "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]
MOE_ARCHITECTURES = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    if arch == "LlamaForCausalLM":
        # Llama 3 rope scaling and tied embeddings: the two Llama variants worth covering.
        return LlamaConfig(**{**TINY_COMMON, "tie_word_embeddings": True}, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "MistralForCausalLM":
        return MistralConfig(**TINY_COMMON, sliding_window=24, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0})
    if arch == "Qwen2ForCausalLM":
        return Qwen2Config(**TINY_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "Qwen3ForCausalLM":
        return Qwen3Config(**{**TINY_COMMON, "head_dim": 32}, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1000000.0})
    if arch == "Phi3ForCausalLM":
        # Fused qkv_proj / gate_up_proj in the checkpoint; LongRoPE's short factors and its
        # attention factor (512 / 64 = 8: sqrt(1 + ln 8 / ln 64) = 1.22) within the original 64.
        factors = torch.Generator().manual_seed(5)
        short = (1 + torch.rand(8, generator=factors)).tolist()
        long = (1 + 10 * torch.rand(8, generator=factors)).tolist()
        return Phi3Config(**TINY_COMMON, original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": 64, "partial_rotary_factor": 1.0})
    if arch == "Gemma3ForCausalLM":
        # Sliding layers (window 12, shorter than prompt + 32 tokens) around a global one, each
        # type with its rope (the global one linear-scaled, as Gemma 3 4B+), a query scale that is
        # not head_dim's, tied embeddings and a final soft-cap (so each of them shows).
        from transformers import Gemma3TextConfig

        common = {k: v for k, v in TINY_COMMON.items() if k not in ("tie_word_embeddings", "num_hidden_layers")}
        return Gemma3TextConfig(**common, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                                sliding_window=12, layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"],
                                final_logit_softcapping=30.0, tie_word_embeddings=True, rope_parameters={
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                                       "factor": 8.0}})
    if arch == "Gemma2ForCausalLM":
        # Attention and final logit soft-capping, small enough caps that they bend the scores.
        from transformers import Gemma2Config

        common = {k: v for k, v in TINY_COMMON.items() if k not in ("tie_word_embeddings", "num_hidden_layers")}
        return Gemma2Config(**common, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24, sliding_window=12,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "MixtralForCausalLM":  # 4 experts, top 2, renormalised; a sliding window as Mistral's
        from transformers import MixtralConfig

        return MixtralConfig(**TINY_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=20,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "Qwen2MoeForCausalLM":
        # A shared expert with its sigmoid gate, qkv bias, top 2 of 4 not renormalised, and a
        # dense layer among the sparse ones (mlp_only_layers).
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(**{**TINY_COMMON, "num_hidden_layers": 3}, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=48, shared_expert_intermediate_size=80, norm_topk_prob=False,
                              mlp_only_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "Qwen3MoeForCausalLM":  # q/k norms; top 3 of 6, renormalised
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**{**TINY_COMMON, "head_dim": 32}, num_experts=6, num_experts_per_tok=3,
                              moe_intermediate_size=48, norm_topk_prob=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    raise KeyError(arch)


def save_tiny_model(arch: str, path, tokenizer_dir: str) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = tiny_config(arch)
    config.architectures = [arch]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "Qwen2ForCausalLM":
        # Random biases so the qkv-bias path is really exercised (they initialise to 0).
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    if arch == "Qwen2MoeForCausalLM":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    if arch in MOE_ARCHITECTURES:
        # Routers start at zero in some inits (every expert tied): random, so the top k differ by token.
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and getattr(gate, "weight", None) is not None and gate.weight.dim() == 2:
                    gate.weight.normal_(0, 0.5)
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        # Gemma's norms start at w = 0 (a scale of 1 + w): random so the 1 + w loading shows.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0, 0.3)
    model.save_pretrained(path)
    copy_tokenizer(tokenizer_dir, path)
    return str(path)


def copy_tokenizer(tokenizer_dir: str, path) -> None:
    """The test tokenizer's files (those it has) into a model folder."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), path)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation of one prompt → (new token ids, raw logits per step)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    new = out.sequences[0, len(prompt_ids):].tolist()
    return new, [logits[0] for logits in out.logits]


def load_hf(path: str, gguf_file: str | None = None):
    import os

    from transformers import AutoModelForCausalLM

    if gguf_file is not None:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file),
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model.eval()


TEXT_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "In 1492, Columbus",
    "Water boils at",
    "import numpy as np\n\nx = np.",
    "Paris is the capital of",
]

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion in one sentence.",
    "List three primary colors.",
    "What is 12 times 12?",
    "Give me a tip for learning Python.",
    "Who wrote Hamlet?",
    "Translate 'good morning' into Spanish.",
]


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what GGUF files store)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _gguf_writer(hf_dir: str, path: str, arch: str):
    """A GGUFWriter for a tiny HF model with the hyper-parameters every architecture writes
    → (writer, HF config, state dict)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w, cfg, load_file(f"{hf_dir}/model.safetensors")


def write_llama_gguf(hf_dir: str, path: str, default_gguf: str, qtype, embedding_qtype=None) -> None:
    """Writes a tiny HF Llama as a llama.cpp-style GGUF (permuted Q/K, 2-D weights in `qtype`, the
    embedding and output weight in `embedding_qtype` if given), with the default model's tokenizer metadata so
    transformers can load it too."""
    import gguf
    import numpy as np

    from asyncllm.model.gguf_file import GGUFFile

    w, cfg, state = _gguf_writer(hf_dir, path, "llama")
    src = GGUFFile(default_gguf).metadata
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(src["tokenizer.ggml.pre"])
    w.add_token_list(src["tokenizer.ggml.tokens"])
    w.add_token_types(src["tokenizer.ggml.token_type"].tolist())
    w.add_token_merges(src["tokenizer.ggml.merges"])
    w.add_bos_token_id(int(src["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(src["tokenizer.ggml.eos_token_id"]))
    w.add_add_bos_token(False)
    w.add_chat_template(src["tokenizer.chat_template"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
                   "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                   "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                   "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
                   "mlp.down_proj.weight": "ffn_down"}
    for name, tensor in state.items():
        if name in names:
            gname = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{layer_names[rest]}.weight"
        if name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, cfg.num_key_value_heads)
        data = tensor.float().numpy()
        if data.ndim == 2:
            is_embedding = gname in ("token_embd.weight", "output.weight")
            kind = embedding_qtype if embedding_qtype is not None and is_embedding else qtype
            w.add_tensor(gname, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            w.add_tensor(gname, data.astype(np.float32))
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":  # Llama 3.1+: the scaling as per-dimension factors
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gemma2_gguf(hf_dir: str, path: str) -> None:
    """Writes a tiny HF Gemma 2 as llama.cpp's convert does (its names, norms stored as 1 + w,
    the soft-caps and sliding window in the metadata; fp32 tensors). No tokenizer: load it with
    `tokenizer=` (transformers' GGUF Gemma tokenizer expects a sentencepiece vocabulary)."""
    import numpy as np

    w, cfg, state = _gguf_writer(hf_dir, path, "gemma2")
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_float32("gemma2.attn_logit_softcapping", cfg.attn_logit_softcapping)
    w.add_float32("gemma2.final_logit_softcapping", cfg.final_logit_softcapping)
    w.add_uint32("gemma2.vocab_size", cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "post_attention_norm",
                   "pre_feedforward_layernorm.weight": "ffn_norm",
                   "post_feedforward_layernorm.weight": "post_ffw_norm",
                   "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                   "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                   "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
                   "mlp.down_proj.weight": "ffn_down"}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied
        if name in names:
            gname = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{layer_names[rest]}.weight"
        data = tensor.float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1  # llama.cpp's Gemma convert stores 1 + w
        w.add_tensor(gname, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama3_rope_freqs(rope: dict, head_dim: int):
    """llama.cpp's convert_hf_to_gguf rule for `rope_freqs.weight` (LlamaModel.generate_extra_tensors):
    1 for short wavelengths, `factor` for long ones, the smooth blend's reciprocal in between."""
    import math

    import numpy as np

    base, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def check_logprobs(completion, hf_logits, atol=2e-3):
    for step, (token, position, logits) in enumerate(zip(completion.token_ids, completion.logprobs, hf_logits)):
        hf_lp = torch.log_softmax(logits.float(), dim=-1)
        assert abs(position[token].logprob - hf_lp[token].item()) < atol, f"step {step}"
        top_ours = sorted((lp.logprob for lp in position.values()), reverse=True)[:3]
        top_hf = hf_lp.topk(3).values.tolist()
        assert top_ours == pytest.approx(top_hf, abs=atol), f"step {step}"


def check_gguf_greedy_matches_transformers(llm, path: str, texts: list[str], max_tokens: int = 12) -> None:
    """Each text's greedy ids equal transformers' on the same GGUF file, and its logprobs close."""
    from asyncllm import SamplingParams

    hf = load_hf(None, gguf_file=path)
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)
    for text in texts:
        ids = tok.encode(text)
        expected, logits = hf_greedy(hf, ids, max_tokens)
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == expected
        check_logprobs(out, logits)


def check_mixed_steps_match_transformers(llm, hf, max_tokens: int = 24) -> list[list[int]]:
    """Three ~30-token prompts and a fourth that extends the first (a prefix-cache hit), decoded
    together (with a small token budget, prompt chunks share steps with decodes): greedy ids equal
    to transformers' and logprobs close. → the prompts, for callers checking more."""
    from asyncllm import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [tok.encode(" ".join(TEXT_PROMPTS[i:] + TEXT_PROMPTS[:i])) for i in range(3)]
    prompts.append(prompts[0] + tok.encode(" and then some more words follow here"))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        hf_tokens, hf_logits = hf_greedy(hf, prompt, max_tokens)
        assert out.outputs[0].token_ids == hf_tokens
        check_logprobs(out.outputs[0], hf_logits)
    return prompts


def check_same_as_reference_engine(llm, reference, max_tokens: int = 12) -> None:
    """Greedy tokens and their top-2 logprobs of `llm` (4- or 8-bit blocks that hold the weights
    exactly) against `reference`'s (the dense fp32 weights), for one, two and three prompts
    together (prefix caches emptied first): the same tokens, logprobs within 1e-4. Not bit for
    bit: the dense weights take the panel GEMM's order at every row count (batch invariance),
    the blocks the few-rows kernel's up to their rows; both orders are exact sums of the same
    products, so they differ by rounding only."""
    from asyncllm import SamplingParams

    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)
    for count in (1, 2, 3):
        prompts = [{"prompt_token_ids": tok.encode(" ".join(TEXT_PROMPTS[i:i + 3]))} for i in range(count)]
        assert all(len(p["prompt_token_ids"]) >= 9 for p in prompts)
        assert llm.reset_prefix_cache() and reference.reset_prefix_cache()
        for a, b in zip(llm.generate(prompts, params, use_tqdm=False),
                        reference.generate(prompts, params, use_tqdm=False)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for got, want in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert got.keys() == want.keys()
                assert all(abs(got[t].logprob - want[t].logprob) <= 1e-4 for t in got)


def save_lora_adapter(base, path, rank: int, targets: list[str], seed: int, alpha: float | None = None,
                      use_rslora: bool = False, b_std: float = 0.05):
    """A PEFT LoRA adapter over `base` (a transformers model, changed in place: it becomes the
    PeftModel, which is returned) with random A and nonzero random B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets,
                        lora_dropout=0.0, use_rslora=use_rslora, bias="none")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


def local_greedy_texts(path: str, prompts: list[str], max_tokens: int = 12) -> list[str]:
    """One in-process engine's greedy texts (fp32): what a split or served engine must give."""
    from asyncllm import LLM, SamplingParams

    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    try:
        return [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0),
                                                        use_tqdm=False)]
    finally:
        llm.engine.shutdown()


def check_serve_gives_one_process_texts(path: str, flags: list[str]) -> None:
    """`asyncllm serve PATH FLAGS` behind the real openai client: the greedy texts of one process."""
    import openai

    from server_helpers import start_cli_server, stop_process

    proc, url = start_cli_server([path, *flags, "--dtype", "float32", "--no-kv-cache-prefault",
                                  "--kv-cache-memory", str(16 << 20)])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        served = [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
                  for p in TEXT_PROMPTS[:3]]
    finally:
        stop_process(proc)
    local = local_greedy_texts(path, TEXT_PROMPTS[:3])
    assert served == local and all(served)


def save_llama_variant(path, tokenizer_dir: str, seed: int, **overrides) -> str:
    """A tiny random Llama with TINY_COMMON changed by `overrides` (e.g. num_hidden_layers=5), with
    the test tokenizer copied beside it → its folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_COMMON, **overrides}, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    copy_tokenizer(tokenizer_dir, path)
    return str(path)


def check_split_matches_transformers(path: str, num_processes: int, max_tokens: int = 24, **engine_args) -> None:
    """A model split over worker processes (tensor / pipeline parallel) gives transformers' greedy
    ids and logprobs with chunked prompts, mixed steps and a prefix-cache hit; its processes run
    while it does and are gone after shutdown."""
    from asyncllm import LLM
    from server_helpers import pid_alive

    llm = LLM(path, dtype="float32", max_num_batched_tokens=20, **engine_args)
    executor = llm.engine.core.executor
    try:
        assert len(executor.processes) == num_processes and all(pid_alive(p.pid) for p in executor.processes)
        check_mixed_steps_match_transformers(llm, load_hf(path), max_tokens=max_tokens)
    finally:
        llm.engine.shutdown()
    assert not any(pid_alive(p.pid) for p in executor.processes)


def check_a_killed_process_stops_the_others(path: str, killed: int, **engine_args) -> None:
    """A split model's worker process `killed` dies (SIGKILL) after a first request: the others are
    stopped too (not left waiting in a collective or a recv) and the engine fails with EngineDeadError."""
    import signal
    import time

    from asyncllm import LLM, EngineDeadError, SamplingParams
    from server_helpers import pid_alive

    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20, **engine_args)
    processes = llm.engine.core.executor.processes
    try:
        assert llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
        os.kill(processes[killed].pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(pid_alive(p.pid) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(pid_alive(p.pid) for p in processes)
        with pytest.raises(EngineDeadError):
            llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.engine.shutdown()


LLAVA_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "examples", "chat_templates", "llava.jinja")


def save_tiny_llava(path, tokenizer_dir: str, tower: str) -> str:
    """A tiny random LLaVA (Llama decoder; `tower` "clip" or "siglip", 30x30 images in 6x6 patches)
    with its processor (image processor, the test tokenizer plus an <image> token, LLaVA's template)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    with open(LLAVA_TEMPLATE) as f:
        tokenizer.chat_template = f.read()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=30,
                  patch_size=6)
    if tower == "clip":  # CLS row dropped, the second-to-last layer's states (llava-1.5's choice)
        vision_config, strategy, layer = CLIPVisionConfig(**vision, projection_dim=16), "default", -2
        image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    else:  # every row, two feature layers concatenated
        vision_config, strategy, layer = SiglipVisionConfig(**vision), "full", [-3, -1]
        image_processor = SiglipImageProcessor(size={"height": 30, "width": 30})
    # Padded to an even vocabulary (as llava-hf pads to 32064), so it splits over 2 tensor-parallel ranks.
    text = LlamaConfig(**{**TINY_COMMON, "vocab_size": len(tokenizer) + 1})
    config = LlavaConfig(vision_config=vision_config, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(1234)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(path)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=6,
                   vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=1 if tower == "clip" else 0).save_pretrained(path)
    return str(path)


def plain_llama(tiny_models) -> str:
    """The tiny Llama, re-saved untied with default rope (what a plain llama GGUF describes)."""
    from transformers import AutoModelForCausalLM

    src = tiny_models("LlamaForCausalLM")
    target = os.path.join(os.path.dirname(src), "plain-llama")
    if not os.path.isdir(target):
        cfg = tiny_config("LlamaForCausalLM")
        cfg.tie_word_embeddings = False
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        cfg.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(7)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(target)
    return target
