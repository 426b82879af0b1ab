"""Several tokens per request per step: the path speculative decoding will use, driven here by
fake proposers. Verified tokens must equal plain decoding, whatever the proposals."""
import contextlib
import dataclasses
import math

import pytest

from asyncllm import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 32


class ReplayProposer:
    """Proposes the tokens a reference run produced next (right, or wrong from position `wrong_at`)."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], wrong_at: int | None = None):
        self.reference = reference
        self.wrong_at = wrong_at
        self.calls = 0

    def propose(self, request, k):
        self.calls += 1
        truth = self.reference[tuple(request.prompt_token_ids)]
        n = len(request.output_token_ids)
        proposal = list(truth[n:n + k])
        if self.wrong_at is not None and len(proposal) > self.wrong_at:
            proposal[self.wrong_at] = (proposal[self.wrong_at] + 1) % 49152
        return proposal

    def finished(self, request):
        pass


@contextlib.contextmanager
def proposing(llm, proposer, k):
    core = llm.engine.core
    config = core.scheduler.config
    core.scheduler.proposer = proposer
    core.scheduler.config = dataclasses.replace(config, num_speculative_tokens=k)
    try:
        yield core
    finally:
        core.scheduler.proposer = None
        core.scheduler.config = config


def _run(llm, params, prompts=PROMPTS):
    core = llm.engine.core
    steps, drafts, accepted = core.num_steps, core.num_draft_tokens, core.num_accepted_tokens
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, core.num_steps - steps, core.num_draft_tokens - drafts, core.num_accepted_tokens - accepted


def _reference(outs):
    return {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in outs}


def test_right_proposals_give_the_same_tokens_in_one_forward_per_k_plus_1(default_llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    plain, plain_steps, _, _ = _run(default_llm, params, PROMPTS[:1])
    k = 3
    with proposing(default_llm, ReplayProposer(_reference(plain)), k):
        spec, steps, drafts, accepted = _run(default_llm, params, PROMPTS[:1])
    assert spec[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert spec[0].outputs[0].text == plain[0].outputs[0].text
    # One prompt step gives the first token; every later forward gives k + 1.
    assert plain_steps == MAX_TOKENS
    assert steps == 1 + math.ceil((MAX_TOKENS - 1) / (k + 1))
    assert drafts == accepted > 0
    for a, b in zip(spec[0].outputs[0].logprobs, plain[0].outputs[0].logprobs):
        assert a.keys() == b.keys()
        for token in a:
            assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-4)


@pytest.mark.parametrize("wrong_at", [0, 1])
def test_wrong_proposals_are_rejected_and_the_tokens_stay_the_same(default_llm, wrong_at):
    """Batched, greedy: a wrong proposal rolls the computed count back; K/V written for it is
    overwritten by the next step."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    plain, _, _, _ = _run(default_llm, params)
    with proposing(default_llm, ReplayProposer(_reference(plain), wrong_at=wrong_at), 3):
        spec, steps, drafts, accepted = _run(default_llm, params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert drafts > accepted
    if wrong_at == 0:
        assert accepted == 0
    else:
        assert steps < MAX_TOKENS and accepted > 0


def test_seeded_sampling_is_unchanged_by_proposals(default_llm):
    """A seeded stream verifies proposals by sampling; rejected rows' draws are undone, so the
    text equals the same seed decoded one token at a time."""
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=7 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    plain, _, _, _ = _run(default_llm, params)
    for wrong_at in (None, 1):
        with proposing(default_llm, ReplayProposer(_reference(plain), wrong_at=wrong_at), 4):
            spec, steps, _, accepted = _run(default_llm, params)
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
        assert accepted > 0


def test_a_stop_inside_a_verified_run_truncates_it(default_llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    plain, _, _, _ = _run(default_llm, params, PROMPTS[:1])
    tokens = plain[0].outputs[0].token_ids
    stop = tokens[10]
    first = tokens.index(stop)
    stopped = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    with proposing(default_llm, ReplayProposer(_reference(plain)), 4):
        spec, _, _, _ = _run(default_llm, stopped, PROMPTS[:1])
    out = spec[0].outputs[0]
    assert out.token_ids == tokens[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    with proposing(default_llm, ReplayProposer(_reference(plain)), 4):  # and at max_tokens
        short, _, _, _ = _run(default_llm, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), PROMPTS[:1])
    assert short[0].outputs[0].token_ids == tokens[:6] and short[0].outputs[0].finish_reason == "length"
    assert default_llm.engine.core.kv.num_used_blocks() == 0
