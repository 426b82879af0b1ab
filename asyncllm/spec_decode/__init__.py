"""Speculative decoding: proposers of tokens the target verifies in one forward (the
scheduler's `Proposer` protocol; verification lives in the model runner)."""
from asyncllm.spec_decode.config import SpeculativeConfig, make_proposer
from asyncllm.spec_decode.ngram import NgramProposer

__all__ = ["NgramProposer", "SpeculativeConfig", "make_proposer"]
