"""SamplingParams validation and the sampler's processors, on hand-made logits."""
import math

import pytest
import torch

from asyncllm.errors import InvalidRequestError
from asyncllm.request import Request
from asyncllm.sampling.metadata import SamplingMetadata, SamplingRow
from asyncllm.sampling.sampler import Sampler
from asyncllm.sampling_params import SamplingLimits, SamplingParams

BAD = [
    ({"n": 0}, "n"), ({"n": 1.5}, "n"), ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": "x"}, "seed"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"stop": [""]}, "stop"),
    ({"stop": [3]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {1: math.inf}}, "logit_bias"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"), ({"output_kind": "delta"}, "output_kind"),
]


@pytest.mark.parametrize("kwargs,param", BAD)
def test_invalid_params_name_the_param(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


def test_limits_are_enforced():
    limits = SamplingLimits(max_n=4, max_logprobs=5, max_stop_strings=2)
    for kwargs, param in [({"n": 5}, "n"), ({"logprobs": 6}, "logprobs"), ({"stop": ["a", "b", "c"]}, "stop"),
                          ({"logit_bias": {100: 1.0}}, "logit_bias"), ({"stop_token_ids": [100]}, "stop_token_ids")]:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**kwargs).check_limits(limits, vocab_size=50)
        assert info.value.param == param
    SamplingParams(n=4, logprobs=5).check_limits(limits, vocab_size=50)


def _req(i=0, **params):
    return Request(f"r{i}", [1, 2, 3], SamplingParams(**params), frozenset({0}), max_tokens=16)


def _batch(requests):
    """The sampler's view of these requests (what a worker's input batch gives it)."""
    rows = [SamplingRow.from_params(r.sampling_params, r.eos_token_ids, r.sample_seed) for r in requests]
    return SamplingMetadata.of(rows, [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests])


def _sample(requests, logits, seed=0):
    return Sampler(seed, torch.device("cpu"))(logits.clone(), _batch(requests))


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(3, 50)
    reqs = [_req(0, temperature=0), _req(1, temperature=1.0, top_k=1), _req(2, temperature=1.0, top_p=1e-6)]
    out = _sample(reqs, logits)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_ties_pick_the_first_index_as_argmax_does():
    logits = torch.zeros(3, 50)
    logits[0, [7, 30]] = 2.0  # a tie
    logits[1, [4, 9]] = float("nan")  # NaN wins, first one (torch's argmax rule)
    logits[2] = 1.0  # all equal
    out = _sample([_req(i, temperature=0) for i in range(3)], logits)
    assert out.token_ids == logits.argmax(-1).tolist() == [7, 4, 0]


def test_random_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    sampler = Sampler(0, torch.device("cpu"))
    counts = [0, 0, 0, 0]
    for _ in range(3000):
        counts[sampler(logits.clone(), _batch([_req(temperature=1.0)])).token_ids[0]] += 1
    assert counts[3] == 0
    assert abs(counts[0] / 3000 - 0.7) < 0.04 and abs(counts[2] / 3000 - 0.1) < 0.03


def test_top_k_and_min_p_restrict_support():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    sampler = Sampler(0, torch.device("cpu"))
    seen_k, seen_min_p = set(), set()
    for _ in range(400):
        seen_k.add(sampler(logits.clone(), _batch([_req(temperature=1.0, top_k=2)])).token_ids[0])
        seen_min_p.add(sampler(logits.clone(), _batch([_req(temperature=1.0, min_p=0.6)])).token_ids[0])
    assert seen_k == {0, 1}
    assert seen_min_p == {0, 1}  # 0.3 >= 0.6 * 0.4 but 0.2 is not


def test_top_k_alone_masks_what_the_sorting_path_masks():
    """Top-k without top-p takes a topk threshold instead of a full sort: the same support, row by
    row, for k of 0 (no limit), 1, 5 and past the vocabulary, mixed in one batch."""
    from asyncllm.sampling.sampler import _apply_top_k, _apply_top_k_top_p

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([0, 1, 5, 1000])
    fast = _apply_top_k(logits.clone(), top_k)
    sorted_path = _apply_top_k_top_p(logits.clone(), top_k, torch.ones(4))
    assert torch.equal(fast.isinf(), sorted_path.isinf())
    assert (~fast.isinf()).sum(-1).tolist() == [300, 1, 5, 300]
    assert torch.equal(fast[~fast.isinf()], logits[~fast.isinf()])


def test_logit_bias_allowed_tokens_and_bad_words():
    logits = torch.zeros(3, 20)
    logits[:, 5] = 10
    r_bias = _req(0, temperature=0, logit_bias={7: 50.0})
    r_allowed = _req(1, temperature=0, allowed_token_ids=[3, 4])
    r_bad = _req(2, temperature=0)
    r_bad.sampling_params._bad_words_token_ids = [[5]]
    out = _sample([r_bias, r_allowed, r_bad], logits)
    assert out.token_ids[0] == 7
    assert out.token_ids[1] in (3, 4)
    assert out.token_ids[2] != 5


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 0] = 10  # EOS
    logits[0, 1] = 9  # a stop token
    req = _req(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert _sample([req], logits).token_ids == [2]  # EOS and the stop token are masked; 2 is the first max
    req.output_token_ids = [4, 4]
    assert _sample([req], logits).token_ids == [0]


def test_penalties():
    logits = torch.zeros(1, 6)
    logits[0, 2] = 1.0
    logits[0, 3] = 0.9
    req = _req(temperature=0, presence_penalty=0.5)
    req.output_token_ids = [2]
    assert _sample([req], logits).token_ids == [3]
    req = _req(temperature=0, repetition_penalty=2.0)  # prompt [1, 2, 3]: token 2's 1.0 becomes 0.5 < 0.8
    logits2 = torch.zeros(1, 6)
    logits2[0, 2] = 1.0
    logits2[0, 5] = 0.8
    assert _sample([req], logits2).token_ids == [5]
    req = _req(temperature=0, frequency_penalty=0.2)
    req.output_token_ids = [2, 2]
    assert _sample([req], logits).token_ids == [3]


def test_logprobs_are_raw_and_ranked():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    out = _sample([_req(temperature=0, logprobs=2, logit_bias={3: 100.0})], logits)
    assert out.token_ids == [3]
    lp = out.logprobs[0]
    raw = torch.log_softmax(logits, -1)[0]
    assert lp.token_ids == [3, 0, 1]
    assert lp.logprobs == pytest.approx([raw[3].item(), raw[0].item(), raw[1].item()])
    assert lp.ranks == [4, 1, 2]
