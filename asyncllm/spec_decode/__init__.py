"""Speculative decoding: proposers of tokens the target verifies in one forward (the
scheduler's `Proposer` protocol; verification lives in the model runner)."""
from asyncllm.spec_decode.config import SpeculativeConfig, make_proposer
from asyncllm.spec_decode.ngram import NgramProposer
from asyncllm.spec_decode.suffix import SuffixProposer

__all__ = ["NgramProposer", "SuffixProposer", "SpeculativeConfig", "make_proposer"]
