"""NgramProposer (prompt lookup): the tokens that followed the last earlier occurrence of the
sequence's final n tokens, for n from prompt_lookup_max down to prompt_lookup_min.

Strong where the output copies its context (rewrites, quotes, code edits); it proposes
nothing when the suffix never occurred before, so free generation costs only the search.
The search is one vectorised comparison of every window of the context (numpy).
"""
from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({prompt_lookup_min}) <= prompt_lookup_max "
                             f"({prompt_lookup_max})")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, request, k: int) -> list[int]:
        return propose_from(request.prompt_token_ids + request.output_token_ids, k, self.min_n, self.max_n)

    def finished(self, request) -> None:
        """Nothing is kept per request."""


def propose_from(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest suffix of length
    min_n..max_n (an earlier match: its continuation is known)."""
    if k <= 0 or len(tokens) <= min_n:
        return []
    context = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = context[-n:]
        # Windows starting at 0 .. len - n - 1: each is followed by at least one known token.
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k]
    return []
