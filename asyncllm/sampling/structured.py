"""Structured outputs (JSON schema, JSON object, regex, choice) on top of outlines-core;
context-free grammars (Lark, GBNF) on llguidance (`lark_grammar`).

- `StructuredOutputs` is what a request asks for (exactly one kind), validated cheaply and
  synchronously against size/depth limits (a schema bomb is refused before compiling).
- `plan` turns a spec into the regex outlines-core compiles and refuses, before compiling,
  whatever is over a bound (`regex_cost` estimates the automaton); `grammar_compiler`
  compiles it in worker processes that can be killed.
- `GrammarState` is one sequence's automaton position (an outlines-core `Guide`).
- `StructuredOutputProcessor` writes the constrained rows' token bitmasks and applies them
  in one vectorised operation; unconstrained rows are not touched.
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm.errors import InvalidRequestError
from asyncllm.sampling.regex_cost import WIDE_CLASS_CHARS, RegexCost, RegexTooComplex, regex_cost


class GrammarError(InvalidRequestError):
    """The requested structure cannot be compiled (too big, too slow, or invalid)."""


@dataclass(frozen=True)
class StructuredLimits:
    """Bounds on what a request may ask to compile, and on the compiler (EngineArgs grammar_*)."""

    max_schema_bytes: int = 64 * 1024
    max_schema_depth: int = 24
    max_enum_values: int = 2048
    max_regex_chars: int = 200_000
    max_choices: int = 1024
    max_grammar_bytes: int = 64 * 1024  # a Lark/GBNF grammar's text
    # The automaton, estimated before compiling (regex_cost): positions after spelling out
    # counted repetitions, and those whose class admits many characters (each costs ~50x).
    max_positions: int = 5000
    max_wide_positions: int = 256
    max_index_bytes: int = 128 << 20  # the compiled Index's binary size
    compile_timeout_s: float = 10.0  # per request, queueing included; the compile is killed after it
    compile_workers: int = 2  # heavy-lane worker processes
    max_queued_compiles: int = 8  # heavy-lane compiles waiting or running; more get 429
    worker_memory_bytes: int = 2 << 30  # RLIMIT_AS of each worker process
    # The light lane: specs estimated at most this big get a worker of their own...
    light_max_positions: int = 1000
    light_max_wide_positions: int = 48
    light_budget_s: float = 1.0  # ...for at most this long, then they move to the heavy lane
    cache_entries: int = 128  # compiled Indexes kept in memory...
    cache_bytes: int = 512 << 20  # ...and their bytes
    disk_cache_bytes: int = 1 << 30  # slow-to-build Indexes kept on disk (0: none)


@dataclass
class StructuredOutputs:
    json: Any = None  # a JSON schema (dict or JSON text) or a pydantic model class
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # a context-free grammar: Lark (llguidance's dialect) or llama.cpp's GBNF

    def __post_init__(self) -> None:
        kinds = [self.json is not None, bool(self.json_object), self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(kinds) != 1:
            raise InvalidRequestError("structured_outputs needs exactly one of json, json_object, regex, choice, "
                                      "grammar", param="structured_outputs")
        if self.json is not None:
            self.json = _schema_dict(self.json)
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) and c
                                                                               for c in self.choice):
                raise InvalidRequestError("choice must be a non-empty list of non-empty strings", param="choice")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise InvalidRequestError("regex must be a non-empty string", param="regex")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise InvalidRequestError("grammar must be a non-empty string (Lark or GBNF)", param="grammar")

    @property
    def kind(self) -> str:
        if self.json is not None:
            return "json"
        if self.json_object:
            return "json_object"
        if self.grammar is not None:
            return "grammar"
        return "regex" if self.regex is not None else "choice"

    def key(self) -> tuple[str, str]:
        """Canonical cache key: equal specs compile once."""
        if self.json is not None:
            return "json", json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "grammar", self.grammar
        return "choice", json.dumps(self.choice)


def _schema_dict(schema: Any) -> dict:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}", param="json_schema") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("a JSON schema must be an object (or a pydantic model class)", param="json_schema")
    return schema


def _check_schema(schema: dict, limits: StructuredLimits) -> None:
    size = len(json.dumps(schema))
    if size > limits.max_schema_bytes:
        raise GrammarError(f"the JSON schema is {size} bytes; the limit is {limits.max_schema_bytes}",
                           param="json_schema")
    enum_total = 0

    def walk(node: Any, depth: int) -> None:
        nonlocal enum_total
        if depth > limits.max_schema_depth:
            raise GrammarError(f"the JSON schema nests deeper than {limits.max_schema_depth} levels",
                               param="json_schema")
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list):
                enum_total += len(node["enum"])
            for value in node.values():
                walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1)

    walk(schema, 0)
    if enum_total > limits.max_enum_values:
        raise GrammarError(f"the JSON schema has {enum_total} enum values; the limit is {limits.max_enum_values}",
                           param="json_schema")


_REGEX_META = set(r".^$*+?()[]{}|\/")


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


# outlines-core ignores minimum/maximum; bounded numbers are swapped for placeholder consts
# before building the regex, and each placeholder's literal is replaced by a range regex.
_MAX_ENUMERATED_RANGE = 2000
_FRACTION = r"(\.[0-9]{1,6})?"


def _int_range(lo: int, hi: int) -> str:
    """Regex of exactly the decimal integers in [lo, hi] (0 <= lo <= hi): small ranges spelt out,
    wide ones as digit-class runs per number of digits (e.g. [0, 50000000]: ...|[1-4][0-9]{7}|50000000)."""
    if hi - lo <= _MAX_ENUMERATED_RANGE:
        return "(" + "|".join(str(v) for v in range(lo, hi + 1)) + ")"
    parts = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        first = 0 if digits == 1 else 10 ** (digits - 1)
        parts += _same_length_range(str(max(lo, first)), str(min(hi, 10 ** digits - 1)))
    return "(" + "|".join(parts) + ")"


def _same_length_range(a: str, b: str) -> list[str]:
    """Alternatives matching exactly the numbers from a to b, both written with the same digit count."""
    if a == b:
        return [a]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [a[0] + rest for rest in _same_length_range(a[1:], b[1:])]
    n = len(a) - 1
    parts, low, high = [], int(a[0]), int(b[0])
    if a[1:] != "0" * n:  # a's first digit only from a's tail up
        parts += [a[0] + rest for rest in _same_length_range(a[1:], "9" * n)]
        low += 1
    if b[1:] != "9" * n:
        high -= 1
    if low <= high:  # whole blocks between: any tail
        parts.append(f"[{low}-{high}][0-9]{{{n}}}" if low < high else f"{low}[0-9]{{{n}}}")
    if b[1:] != "9" * n:  # b's first digit only up to b's tail
        parts += [b[0] + rest for rest in _same_length_range("0" * n, b[1:])]
    return parts


def _number_regex(lo: int, hi: int, integer: bool) -> str:
    """Numbers in [lo, hi] for integer bounds; fractions only where they stay inside."""
    frac = "" if integer else _FRACTION
    parts = []
    if hi >= 0:
        start = max(lo, 0)
        if integer or start == hi:
            parts.append(_int_range(start, hi))
        else:
            parts.append(_int_range(start, hi - 1) + frac + "|" + str(hi))
    if lo < 0:
        k_min = -hi if hi < 0 else 1
        k_max = -lo
        if integer or k_min == k_max:
            parts.append("-" + _int_range(k_min, k_max))
        else:
            parts.append("-(" + _int_range(k_min, k_max - 1) + frac + "|" + str(k_max) + ")")
    return "(" + "|".join(parts) + ")"


def _replace_bounded_numbers(schema: Any, ranges: dict[str, str]) -> Any:
    if isinstance(schema, list):
        return [_replace_bounded_numbers(v, ranges) for v in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if kind in ("integer", "number") and _is_int(lo) and _is_int(hi) and lo <= hi and "enum" not in schema:
        placeholder = f"ASYNCLLMRANGE{len(ranges)}X"
        ranges[placeholder] = _number_regex(int(lo), int(hi), kind == "integer")
        return {"const": placeholder}
    return {k: _replace_bounded_numbers(v, ranges) for k, v in schema.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def plan(spec: StructuredOutputs, limits: StructuredLimits) -> tuple[str, RegexCost]:
    """The regex for this spec and its estimated cost; GrammarError for what is over a limit,
    found here in milliseconds rather than by a compile that runs for minutes."""
    from outlines_core.json_schema import build_regex_from_schema

    param = _param(spec)
    if len(spec.regex or "") > limits.max_regex_chars:
        raise GrammarError(f"the regex has {len(spec.regex)} characters; the limit is {limits.max_regex_chars}",
                           param=param)
    if spec.json is not None:
        _check_schema(spec.json, limits)
        try:
            ranges: dict[str, str] = {}
            # Costed before the numeric ranges are put in: their alternations of digits compile
            # to a few states whatever their length.
            costed = regex = build_regex_from_schema(json.dumps(_replace_bounded_numbers(spec.json, ranges)))
            for placeholder, number in ranges.items():
                regex = regex.replace(f'"{placeholder}"', number)
        except Exception as exc:  # noqa: BLE001 - outlines rejects unsupported schemas
            raise GrammarError(f"unsupported JSON schema: {exc}", param="json_schema") from None
    elif spec.json_object:
        costed = regex = build_regex_from_schema('{"type": "object"}')
    elif spec.regex is not None:
        costed = regex = spec.regex
    else:
        if len(spec.choice) > limits.max_choices:
            raise GrammarError(f"at most {limits.max_choices} choices", param="choice")
        costed = regex = "(" + "|".join(_escape(c) for c in spec.choice) + ")"
    if len(regex) > limits.max_regex_chars:
        raise GrammarError(f"the structure compiles to a {len(regex)}-character regex; the limit is "
                           f"{limits.max_regex_chars}", param=param)
    try:
        cost = _choice_cost(spec.choice) if spec.choice is not None else regex_cost(costed)
    except re.error as exc:
        raise GrammarError(f"invalid regex: {exc}", param=param) from None
    except RegexTooComplex as exc:
        raise GrammarError(str(exc), param=param) from None
    if cost.positions > limits.max_positions:
        raise GrammarError(f"the structure expands to {cost.positions} character positions (counted repetitions "
                           f"spelt out); the limit is {limits.max_positions} (grammar_max_positions)", param=param)
    if cost.wide_positions > limits.max_wide_positions:
        raise GrammarError(f"the structure has {cost.wide_positions} bounded positions of free text (e.g. "
                           f"[a-z]{{1,N}} or a string's maxLength); the limit is {limits.max_wide_positions} "
                           "(grammar_max_wide_positions)", param=param)
    return regex, cost


def _choice_cost(choices: list[str]) -> RegexCost:
    """What regex_cost gives the alternation of these literal choices, without parsing it (1,000
    choices took sre_parse 0.2-0.5 s). Python's parser moves the choices' common prefix out of the
    branches, and makes one-character branches a class (tests/unit: equal on random lists)."""
    common = len(os.path.commonprefix(choices))
    rest = [c[common:] for c in choices]
    if len(rest) > 1 and all(len(r) == 1 for r in rest):
        return RegexCost(common + 1, int(len(set(rest)) >= WIDE_CLASS_CHARS))
    return RegexCost(common + sum(map(len, rest)), 0)


def _param(spec: StructuredOutputs) -> str:
    return {"json": "json_schema", "json_object": "response_format"}.get(spec.kind, spec.kind)


class OutlinesGrammar:
    """A compiled outlines-core Index; each sequence walks it with a Guide of its own."""

    def __init__(self, index):
        self.index = index

    def new_guide(self):
        from outlines_core import Guide

        return Guide(self.index)


class GrammarState:
    """One sequence's position in its automaton; created when the compile is ready. Its guide
    (an outlines-core Guide, or `lark_grammar.LarkGuide`) advances by token, writes the next
    position's allowed-token bitmask, and says when the structure is finished."""

    def __init__(self, future: Future, eos_token_id: int, deadline: float):
        self.future = future
        self.eos_token_id = eos_token_id
        self.deadline = deadline
        self.guide = None
        # Masks of this step's rows when it verifies proposals (propose_along), else None.
        self.spec_masks: torch.Tensor | None = None

    def ready(self) -> bool:
        """True once the guide exists; raises the compile error (or a timeout) if compiling failed."""
        if self.guide is not None:
            return True
        if not self.future.done():
            if time.monotonic() > self.deadline:
                raise GrammarError("compiling the structure took longer than the limit")
            return False
        self.guide = self.future.result().new_guide()
        return True

    def accept(self, token: int) -> None:
        """Moves past `token`; GrammarError if the grammar cannot go on (llguidance ran out of fuel)."""
        if token != self.eos_token_id:
            self.guide.advance(token)
        failure = getattr(self.guide, "failure", None)
        if failure is not None and (message := failure()):
            # The first line says why; the rest is llguidance's dump of the parser state.
            raise GrammarError(f"the grammar cannot continue: {message.splitlines()[0]}", param="grammar")

    def finished(self) -> bool:
        return self.guide is not None and self.guide.is_finished()

    def propose_along(self, tokens: list[int], vocab_size: int) -> int:
        """Speculative proposals under the grammar: walks them one by one, keeping the allowed-token
        mask of each position (the next one, then after each accepted proposal) in `spec_masks`,
        stops at the first the grammar refuses (or at EOS), then rolls the guide back to where it
        was. → how many of `tokens` the grammar accepts (spec_masks holds that many + 1 rows).
        (A grammar out of llguidance's fuel shows when the kept tokens are accepted for good.)"""
        words = (vocab_size + 31) // 32
        masks = torch.zeros(len(tokens) + 1, words, dtype=torch.int32)

        def write(j: int) -> torch.Tensor:
            row = masks[j]
            self.guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
            return row

        accepted = 0
        for j, token in enumerate(tokens):
            row = write(j)
            if token == self.eos_token_id or not (int(row[token // 32]) >> (token % 32)) & 1:
                break
            self.guide.advance(token)
            accepted += 1
        else:
            write(len(tokens))
        if accepted:
            self.guide.rollback_state(accepted)
        self.spec_masks = masks[:accepted + 1]
        return accepted


def write_bitmask(guides: list, vocab_size: int) -> torch.Tensor:
    """The allowed-token bitmask of each guide's next position: [len(guides), words] int32
    (computed on the engine side, where the automata live, and shipped with the step)."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(guides), words, dtype=torch.int32)
    for j, guide in enumerate(guides):
        row = bitmask[j]
        guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
    return bitmask


class StructuredOutputProcessor:
    """Masks every token the automaton does not allow next, for the constrained rows only."""

    def apply(self, logits: torch.Tensor, meta) -> None:
        if not meta.grammar_rows:
            return
        vocab = logits.shape[1]
        bitmask = meta.grammar_bitmask
        n, words = bitmask.shape
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(n, words * 32)[:, :vocab]
        index = torch.tensor(meta.grammar_rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
