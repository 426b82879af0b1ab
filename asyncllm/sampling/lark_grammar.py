"""Context-free grammars (Lark, or llama.cpp's GBNF) for structured outputs, on llguidance.

outlines-core compiles regular languages only; a grammar (nested expressions, a small
language, SQL) needs a parser, so `StructuredOutputs(grammar=...)` goes to llguidance, the
library vLLM's `guidance` backend uses. Why it runs in the engine process and not in the
compile workers: llguidance builds its lexer lazily and bounds every step with fuel
(`LLParserLimits`), so a hostile grammar costs milliseconds per token, never minutes, and
grammars whose automaton would explode (`/(a|b)*a(a|b){200}/`) stay cheap.

- `LarkGrammars` turns a request's grammar text into a checked llguidance matcher on one
  background thread (building the token trie takes ~0.4 s, once; a grammar 1-600 ms);
  syntax errors become the request's `GrammarError` (HTTP 400).
- `CompiledLark.new_guide()` gives each sequence its own matcher (a cheap deep copy).
- `LarkGuide` is the guide interface `GrammarState` drives: advance, mask, finished.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from asyncllm.sampling.structured import (
    GrammarError,
    StructuredLimits,
    StructuredOutputs,
)

# A GBNF rule: `name ::= ...` at the start of a line (Lark writes `name: ...`).
_GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z_][A-Za-z0-9_-]*\s*::=")


def to_lark(text: str) -> str:
    """Lark as is (incl. `?rule`, `%import common.X`, `%ignore`); llama.cpp GBNF converted by llguidance."""
    if _GBNF_RULE.search(text) is None:
        return text
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(text)
    except Exception as exc:  # noqa: BLE001 - its own error type: the grammar's syntax
        raise ValueError(f"cannot read the GBNF grammar: {exc}") from None


class LarkGuide:
    """One sequence's llguidance matcher."""

    def __init__(self, matcher, vocab_words: int):
        self.matcher = matcher
        self._words = vocab_words  # the tokenizer's vocabulary in 32-token words (the model's may be larger)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)  # on failure the matcher holds the error (see `failure`)

    def write_mask_into(self, pointer: int, numel: int, element_size: int) -> None:
        self.matcher.unsafe_compute_mask_ptr(pointer, min(numel, self._words) * element_size)

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def rollback_state(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` advances (speculative proposals checked, then taken back)."""
        self.matcher.rollback(num_tokens)

    def failure(self) -> str | None:
        """Why the grammar cannot go on (a step past llguidance's fuel limits), or None."""
        return self.matcher.get_error() if self.matcher.is_error() else None


class CompiledLark:
    """A checked grammar: a matcher at the start, copied for every sequence."""

    def __init__(self, matcher, vocab_words: int):
        self._template = matcher
        self._words = vocab_words

    def new_guide(self) -> LarkGuide:
        return LarkGuide(self._template.deep_copy(), self._words)


class LarkGrammars:
    """Compiles grammar specs for one tokenizer, one at a time on a background thread."""

    def __init__(self, tokenizer, limits: StructuredLimits, parser_limits=None):
        self.tokenizer = tokenizer
        self.limits = limits
        self._parser_limits = parser_limits  # llguidance.LLParserLimits; None: llguidance's defaults
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="asyncllm-lark")

    def submit(self, spec: StructuredOutputs) -> Future:
        """Checks the size now; converts, validates and builds the matcher in the background."""
        text = spec.grammar
        size = len(text.encode())
        if size > self.limits.max_grammar_bytes:
            raise GrammarError(f"the grammar is {size} bytes; the limit is {self.limits.max_grammar_bytes}",
                               param="grammar")
        with self._lock:
            if self._pool is None:
                raise GrammarError("the grammar compiler is shut down")
            return self._pool.submit(self._compile, text)

    def _compile(self, text: str) -> CompiledLark:
        import llguidance

        tokenizer = self._llguidance_tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(to_lark(text))
            matcher = llguidance.LLMatcher(tokenizer, grammar, limits=self._parser_limits, log_level=0)
        except Exception as exc:  # noqa: BLE001 - whatever the text does to the parser is the request's error
            raise GrammarError(f"invalid grammar: {exc}", param="grammar") from None
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error()}", param="grammar")
        return CompiledLark(matcher, (tokenizer.vocab_size + 31) // 32)

    def _llguidance_tokenizer(self):
        """llguidance's view of the tokenizer (its token trie), built on first use."""
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer)
        return self._ll_tokenizer

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
