"""Embeddings: an encoder (all-MiniLM-L6-v2) equal to sentence-transformers, and decoder pooling
(last token, mean, CLS) equal to transformers' hidden states, batched, alone, in chunks and from
the prefix cache; per-request dimensions/normalize; what an embedding engine refuses."""
import numpy as np
import pytest
import torch

from asyncllm import (
    LLM,
    InvalidRequestError,
    PoolingParams,
    PromptTooLongError,
    SamplingParams,
)


def texts(count: int = 32) -> list[str]:
    """Varied English texts from the stdlib's pydoc topics (offline), 1 to ~90 words each."""
    from pydoc_data.topics import topics

    out = []
    for i, key in enumerate(sorted(topics)[:count]):
        words = topics[key].split()
        out.append(" ".join(words[:1 + (i * 37) % 90]))
    return out


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def sentence_transformer(minilm_path):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    return SentenceTransformer(minilm_path, device="cpu")


def test_minilm_equals_sentence_transformers_batched_and_alone(minilm_llm, sentence_transformer):
    inputs = texts()
    reference = sentence_transformer.encode(inputs, batch_size=8)
    batched = np.array([o.outputs.embedding for o in minilm_llm.embed(inputs, use_tqdm=False)])
    alone = np.array([minilm_llm.embed(t, use_tqdm=False)[0].outputs.embedding for t in inputs])
    assert batched.shape == reference.shape == (32, 384)
    assert cosine(batched, reference).min() >= 0.9999
    assert cosine(alone, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)  # the folder's Normalize module
    assert np.abs(batched - alone).max() < 1e-5  # batch-invariant to fp32 rounding


def test_truncation_matches_sentence_transformers_max_seq_length(minilm_llm, sentence_transformer):
    long_text = " ".join(texts(32))  # far past the 256 tokens the model was trained on
    with pytest.raises(PromptTooLongError, match="truncate_prompt_tokens"):
        minilm_llm.embed(long_text, use_tqdm=False)
    ours = minilm_llm.embed(long_text, use_tqdm=False, truncate_prompt_tokens=256)[0]
    assert len(ours.prompt_token_ids) == 256
    assert cosine(ours.outputs.embedding, sentence_transformer.encode(long_text)) >= 0.9999


def matryoshka_copy(minilm_path: str, target) -> str:
    """The MiniLM folder with `matryoshka_dimensions` in its config.json (files linked, not copied)."""
    import json
    import os

    for root, _, files in os.walk(minilm_path):
        for name in files:
            source = os.path.join(root, name)
            dest = target / os.path.relpath(source, minilm_path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if name == "config.json" and root == minilm_path:
                config = json.load(open(source))
                dest.write_text(json.dumps({**config, "matryoshka_dimensions": [384, 128, 64]}))
            else:
                os.symlink(source, dest)
    return str(target)


def test_dimensions_and_normalize_per_request(minilm_llm, minilm_path, tmp_path):
    full = minilm_llm.embed("hello there", PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    assert len(full) == 384 and abs(np.linalg.norm(full) - 1) > 0.01
    with pytest.raises(InvalidRequestError, match="Matryoshka"):  # not trained for truncation: refused
        minilm_llm.embed("x", PoolingParams(dimensions=64), use_tqdm=False)
    llm = LLM(matryoshka_copy(minilm_path, tmp_path / "m"), dtype="float32")
    try:
        short = llm.embed("hello there", PoolingParams(dimensions=64), use_tqdm=False)[0].outputs.embedding
        with pytest.raises(InvalidRequestError, match="384, 128, 64"):
            llm.embed("x", PoolingParams(dimensions=100), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    expected = np.array(full[:64]) / np.linalg.norm(full[:64])
    assert len(short) == 64 and np.allclose(short, expected, atol=1e-6)


def test_an_encoder_refuses_generation(minilm_llm, minilm_path):
    with pytest.raises(InvalidRequestError, match="serves embeddings"):
        minilm_llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="encoder"):
        LLM(minilm_path, task="generate")


@pytest.fixture(scope="module")
def hf_decoder(default_gguf):
    from transformers import AutoModel

    return AutoModel.from_pretrained(default_gguf.rsplit("/", 1)[0], gguf_file=default_gguf.rsplit("/", 1)[1],
                                     dtype=torch.float32).eval()


def _hf_pooled(model, ids: list[int], pooling: str) -> np.ndarray:
    with torch.inference_mode():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
    return torch.nn.functional.normalize(vector, dim=0).numpy()


@pytest.mark.parametrize("pooling", ["LAST", "MEAN", "CLS"])
def test_decoder_pooling_equals_transformers_hidden_states(hf_decoder, pooling):
    # A step budget of 16 tokens splits the longer inputs into chunks (MEAN sums across them).
    llm = LLM(dtype="float32", pooler_config={"pooling_type": pooling}, max_num_batched_tokens=16,
              kv_cache_memory=64 << 20)
    inputs = texts(6)
    try:
        outs = llm.embed(inputs, use_tqdm=False)
        again = llm.embed(inputs[:3], use_tqdm=False)  # LAST: served from the prefix cache but the last token
    finally:
        llm.engine.shutdown()
    for out in outs:
        assert cosine(out.outputs.embedding, _hf_pooled(hf_decoder, out.prompt_token_ids, pooling)) >= 0.9999
    assert any(len(o.prompt_token_ids) > 16 for o in outs)
    for first, second in zip(outs, again):
        assert np.abs(np.array(first.outputs.embedding) - second.outputs.embedding).max() < 1e-4
    if pooling == "LAST":
        assert again[2].metrics.num_cached_tokens > 0
    else:
        assert again[2].metrics.num_cached_tokens == 0  # every position is needed: no cache


def test_a_generating_decoder_embeds_too_without_changing_its_tokens(default_llm):
    params = SamplingParams(max_tokens=12, temperature=0)
    before = default_llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0].token_ids
    engine = default_llm.engine
    engine.add_request("gen", "The capital of France is", SamplingParams(max_tokens=12, temperature=0))
    engine.add_request("emb", "The capital of France is", PoolingParams())
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finals["gen"].outputs[0].token_ids == before
    assert len(finals["emb"].outputs.embedding) == 576


def test_the_mp_executor_pools_the_same(minilm_llm, minilm_path):
    llm = LLM(minilm_path, dtype="float32", distributed_executor_backend="mp")
    try:
        inputs = texts(5)
        remote = [o.outputs.embedding for o in llm.embed(inputs, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    local = [o.outputs.embedding for o in minilm_llm.embed(inputs, use_tqdm=False)]
    assert np.array_equal(np.array(remote), np.array(local))
