"""Sampled speculation keeps the target's distribution. A verification step samples every
position from the target model with the request's own random draws and keeps a proposal only where
the sample equals it, so each emitted token is a sample of the target given the tokens before it.
Checked statistically: 10,000 samples of the next two tokens at temperature 1 with top_k 4 (16
outcomes), with ngram proposals that the model often accepts, against the exact distribution
transformers gives, with a chi-square test (p > 0.01), and the same without speculation. The global
generator is seeded, so the test is deterministic."""
import pytest
import torch

import helpers
from asyncllm import LLM, SamplingParams

SAMPLES = 10_000
TOP_K = 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _top_k_probs(logits: torch.Tensor) -> dict[int, float]:
    values, ids = logits.double().topk(TOP_K)
    return dict(zip(ids.tolist(), torch.softmax(values, -1).tolist()))


def _next_two(hf, prompt: list[int]) -> dict[tuple[int, int], float]:
    """P(t1, t2) of top-k-4 sampling at temperature 1, exactly (float64 softmax of the logits)."""
    with torch.no_grad():
        first = _top_k_probs(hf(torch.tensor([prompt])).logits[0, -1])
        out = {}
        for t1, p1 in first.items():
            second = _top_k_probs(hf(torch.tensor([prompt + [t1]])).logits[0, -1])
            out.update({(t1, t2): p1 * p2 for t2, p2 in second.items()})
    return out


def _a_prompt_whose_proposals_are_likely(hf) -> tuple[list[int], dict[tuple[int, int], float]]:
    """[x, y, z, w, ..., x, y]: ngram proposes z then w (what followed the earlier "x y"). Picks the
    first candidate where the pair (z, w) has a fair chance, so proposals are often accepted."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y, filler = torch.randint(1000, 40000, (3,), generator=generator).tolist()
        # z, w: the model's likeliest continuation of "... x y"
        base = [filler, x, y]
        with torch.no_grad():
            z = int(hf(torch.tensor([base])).logits[0, -1].argmax())
            w = int(hf(torch.tensor([base + [z]])).logits[0, -1].argmax())
        prompt = [filler, x, y, z, w, filler, x, y]
        probs = _next_two(hf, prompt)
        if probs.get((z, w), 0.0) > 0.15:
            return prompt, probs
    raise AssertionError("no prompt with a likely proposal among 200 candidates")


def _chi_square_p(counts: dict[tuple[int, int], int], probs: dict[tuple[int, int], float]) -> float:
    from scipy.stats import chisquare

    assert set(counts) <= set(probs)  # nothing outside top-k was ever sampled
    cells = sorted(probs)
    observed = [counts.get(c, 0) for c in cells]
    expected = [probs[c] * SAMPLES for c in cells]
    return float(chisquare(observed, [e * sum(observed) / sum(expected) for e in expected]).pvalue)


def _sample(llm: LLM, prompt: list[int]) -> dict[tuple[int, int], int]:
    torch.manual_seed(1234)
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=TOP_K, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt}] * SAMPLES, params, use_tqdm=False)
    counts: dict[tuple[int, int], int] = {}
    for out in outputs:
        pair = tuple(out.outputs[0].token_ids)
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def test_sampled_speculation_keeps_the_target_distribution(tiny_models):
    path = tiny_models("LlamaForCausalLM")
    hf = helpers.load_hf(path)
    prompt, probs = _a_prompt_whose_proposals_are_likely(hf)
    common = dict(dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=256, enable_prefix_caching=True)
    spec = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2,
                                         "prompt_lookup_max": 2, "disable_by_batch_size": None}, **common)
    plain = LLM(path, **common)
    with_speculation = _sample(spec, prompt)
    assert spec.engine.core.num_accepted_tokens > SAMPLES // 10  # proposals were verified and often kept
    without = _sample(plain, prompt)
    assert _chi_square_p(with_speculation, probs) > 0.01
    assert _chi_square_p(without, probs) > 0.01
