"""SuffixProposer: suffix decoding (vLLM's `"method": "suffix"`, from Arctic Inference).

Two frequency tries of bounded depth over token sequences: one per running request (its
prompt and output so far, extended as it grows) and one shared by all, of the outputs of the
last `max_cached_requests` finished requests (agent loops and repeated edits write the same
text again). Every position's next `max_tree_depth` tokens are a path in its trie, with a
count on each node.

A proposal matches a suffix of the request's context in a trie (at most depth - 1 tokens),
then follows the most frequent child while the product of the children's frequencies stays
>= `min_token_prob`, for at most min(k, match length x `max_spec_factor`, the levels left
below the match) tokens. Every match length in the request's own trie and in the shared one
proposes (longest first); the proposal with the largest expected number of accepted tokens
(the sum of those products) wins. Proposals are verified
by the target like any other, so they change speed, never tokens.
"""
from __future__ import annotations

from collections import deque


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0


class SuffixTrie:
    """Every window of up to `depth` tokens of the sequences added, with occurrence counts
    (a node's count: how often the path to it occurred)."""

    def __init__(self, depth: int):
        self.depth = depth
        self.root = _Node()

    def start(self) -> list[_Node | None]:
        """The cursor of an empty text: the nodes of its suffixes by length (just the root)."""
        return [self.root]

    def extend(self, cursor: list[_Node | None], token: int, sign: int = 1) -> list[_Node | None]:
        """Counts (sign 1) or uncounts (-1) the windows that end with `token`, after the text whose
        suffix nodes are `cursor` (index = suffix length); → the cursor after `token`."""
        after: list[_Node | None] = [self.root]
        for node in cursor:
            child = None
            if node is not None:
                child = node.children.get(token)
                if child is None and sign > 0:
                    child = node.children[token] = _Node()
                if child is not None:
                    child.count += sign
                    if child.count <= 0:  # (its subtree's counts reach 0 with it)
                        del node.children[token]
                        child = None
            after.append(child)
        return after[:self.depth]

    def add(self, tokens: list[int], sign: int = 1) -> None:
        cursor = self.start()
        for token in tokens:
            cursor = self.extend(cursor, token, sign)

    def suffix_nodes(self, context: list[int]) -> list[_Node | None]:
        """The nodes of the suffixes of `context` shorter than `depth`, by length (None: absent)."""
        nodes: list[_Node | None] = [self.root]
        for length in range(1, min(self.depth - 1, len(context)) + 1):
            node = self.root
            for token in context[len(context) - length:]:
                node = node.children.get(token)
                if node is None:
                    break
            nodes.append(node)
        return nodes

    @staticmethod
    def follow(node: _Node, limit: int, min_prob: float) -> tuple[list[int], float]:
        """The most frequent path below `node` while its probability stays >= min_prob →
        (tokens, expected accepted tokens)."""
        tokens: list[int] = []
        prob, expected = 1.0, 0.0
        while len(tokens) < limit and node.children:
            total = sum(child.count for child in node.children.values())
            token, child = max(node.children.items(), key=lambda item: item[1].count)
            prob *= child.count / total
            if prob < min_prob:
                break
            tokens.append(token)
            expected += prob
            node = child
        return tokens, expected


class SuffixProposer:
    def __init__(self, max_tree_depth: int = 24, max_cached_requests: int = 10000, max_spec_factor: float = 1.0,
                 min_token_prob: float = 0.1):
        self.depth = max_tree_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.max_cached_requests = max_cached_requests
        self.shared = SuffixTrie(max_tree_depth)
        self._cached: deque[list[int]] = deque()  # the outputs counted in `shared`, oldest first
        # request id → (its trie, the cursor after its indexed tokens, how many are indexed)
        self._local: dict[str, tuple[SuffixTrie, list, int]] = {}

    def propose(self, request, k: int) -> list[int]:
        n = request.num_tokens
        entry = self._local.get(request.request_id)
        trie, cursor, indexed = entry if entry is not None else (SuffixTrie(self.depth), None, 0)
        cursor = cursor or trie.start()
        for token in request.token_ids(indexed, n):  # the new tokens (a preempted request keeps its trie)
            cursor = trie.extend(cursor, token)
        self._local[request.request_id] = (trie, cursor, n)
        tail = request.token_ids(max(0, n - (self.depth - 1)), n)  # all the shared trie can match
        best: tuple[list[int], float] = ([], 0.0)
        for source, nodes in ((trie, cursor), (self.shared, self.shared.suffix_nodes(tail))):
            # Longest match first; a deep match leaves fewer levels to follow, so shorter ones compete.
            for length in range(len(nodes) - 1, 0, -1):
                node = nodes[length]
                if node is None or not node.children:
                    continue
                limit = min(k, max(1, int(length * self.max_spec_factor)), self.depth - length)
                proposal = source.follow(node, limit, self.min_token_prob)
                if proposal[1] > best[1]:
                    best = proposal
                if len(best[0]) == k:
                    return best[0]
        return best[0]

    def finished(self, request) -> None:
        """A request ended: its trie goes, its output joins the shared cache (the oldest leaves)."""
        self._local.pop(request.request_id, None)
        output = list(request.output_token_ids)
        if not output or self.max_cached_requests == 0:
            return
        self.shared.add(output)
        self._cached.append(output)
        if len(self._cached) > self.max_cached_requests:
            self.shared.add(self._cached.popleft(), sign=-1)
