"""Speculative decoding, method suffix: the tries count what they should, proposals come from a
request's own text and from earlier requests' outputs, and the tokens are those of plain decoding."""
import pytest

from asyncllm import LLM, SamplingParams
from asyncllm.request import Request
from asyncllm.spec_decode import SpeculativeConfig
from asyncllm.spec_decode.suffix import SuffixProposer, SuffixTrie


def _request(rid: str, prompt: list[int], output: list[int] = ()) -> Request:
    r = Request(rid, list(prompt), SamplingParams(), frozenset(), 16)
    r.output_token_ids = list(output)
    return r


def test_trie_counts_every_window_and_forgets_them():
    trie = SuffixTrie(depth=3)
    trie.add([1, 2, 3, 1, 2, 4])
    ones = trie.root.children[1]
    assert ones.count == 2 and ones.children[2].count == 2
    assert {t: n.count for t, n in ones.children[2].children.items()} == {3: 1, 4: 1}
    assert 3 not in ones.children[2].children[3].children  # windows are at most 3 tokens long
    trie.add([1, 2, 3, 1, 2, 4], sign=-1)
    assert trie.root.children == {}


def test_proposals_from_the_requests_own_text_and_from_finished_outputs():
    proposer = SuffixProposer(max_tree_depth=8, max_spec_factor=2.0)
    pattern = [5, 6, 7, 8, 9]
    request = _request("a", [1] + pattern + [2], [5, 6])
    assert proposer.propose(request, 4) == [7, 8, 9, 2]  # what followed "5 6" before (its own prompt)
    proposer.finished(_request("old", [3], [40, 41, 42, 43, 44, 45]))
    other = _request("b", [9, 9, 40, 41])
    assert proposer.propose(other, 3) == [42, 43, 44]  # from the shared trie of finished outputs
    assert proposer.propose(_request("c", [70, 71]), 4) == []  # nothing seen: nothing proposed
    proposer.finished(request)
    assert "a" not in proposer._local


def test_the_shared_trie_keeps_only_the_last_outputs():
    proposer = SuffixProposer(max_tree_depth=4, max_cached_requests=1)
    proposer.finished(_request("x", [0], [11, 12, 13]))
    proposer.finished(_request("y", [0], [21, 22, 23]))
    assert 11 not in proposer.shared.root.children and 21 in proposer.shared.root.children


def test_config_is_validated():
    config = SpeculativeConfig.parse({"method": "suffix", "num_speculative_tokens": 8,
                                      "suffix_decoding_max_tree_depth": 32})
    assert config.suffix_decoding_max_tree_depth == 32
    with pytest.raises(ValueError, match="min_token_prob"):
        SpeculativeConfig.parse({"method": "suffix", "suffix_decoding_min_token_prob": 2})


def test_suffix_decoding_gives_the_tokens_of_plain_decoding_and_learns_from_earlier_requests(default_llm):
    llm = LLM(dtype="float32", speculative_config={"method": "suffix", "num_speculative_tokens": 8})
    try:
        tok = llm.get_tokenizer()
        passage = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his "
                   "chin nuzzled into his breast in an effort to escape the vile wind, slipped quickly.")
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Repeat this text exactly:\n{passage}"}],
                                           tokenize=False, add_generation_prompt=True),
                   "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
                   "Once upon a time"]
        for params in (SamplingParams(max_tokens=40, temperature=0), SamplingParams(max_tokens=40, temperature=0.8,
                                                                                      seed=3)):
            got = llm.generate(prompts, params, use_tqdm=False)
            want = default_llm.generate(prompts, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        # The same free-form request again: its earlier output is in the shared trie, so most of it is proposed.
        core = llm.engine.core
        story = SamplingParams(max_tokens=40, temperature=0)
        steps = core.num_steps
        first = llm.generate("Tell me about the sea.", story, use_tqdm=False)[0]
        first_steps = core.num_steps - steps
        steps = core.num_steps
        again = llm.generate("Tell me about the sea.", story, use_tqdm=False)[0]
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        assert core.num_steps - steps < first_steps / 2
        assert again.metrics.spec_num_accepted_tokens > len(again.outputs[0].token_ids) / 2
        assert core.kv.num_used_blocks() == 0
    finally:
        llm.engine.shutdown()
