"""What a regex will cost outlines-core to compile, estimated before compiling it.

outlines-core turns a regex into a DFA and then walks every vocabulary token from every
state; its time and memory grow with the number of positions in the expanded pattern
(`x{1000}` is 1000 positions, `(x{10}){10}` is 100) and most with positions whose class
admits many characters (each lets thousands of tokens through: a `"[^"]{0,200}"` string
is 200 such positions, ~70 MB of index). Measured on the default model's 49k-token
vocabulary (2 vCPUs): 1,000 wide positions 1.5 s / 68 MB, 3,000 4.2 s / 208 MB, 60,000
never finished (6-11 GB); 5,000 narrow positions 2.7 s / 0.1 MB.

The estimate walks Python's own parse of the pattern (the syntax outlines-core accepts is
close to Python's; a pattern Python cannot parse is refused anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

try:  # Python >= 3.11
    import re._constants as sre_constants
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

# A class admitting at least this many characters counts as wide.
WIDE_CLASS_CHARS = 16
_C = sre_constants
_REPEATS = {_C.MAX_REPEAT, _C.MIN_REPEAT} | ({_C.POSSESSIVE_REPEAT} if hasattr(_C, "POSSESSIVE_REPEAT") else set())


@dataclass(frozen=True)
class RegexCost:
    positions: int  # character positions after expanding counted repetitions
    wide_positions: int  # of which admit >= WIDE_CLASS_CHARS characters

    def __add__(self, other: "RegexCost") -> "RegexCost":
        return RegexCost(self.positions + other.positions, self.wide_positions + other.wide_positions)

    def times(self, n: int) -> "RegexCost":
        return RegexCost(self.positions * n, self.wide_positions * n)


ZERO = RegexCost(0, 0)


class RegexTooComplex(ValueError):
    pass


# Deeper groups are refused before parsing: Python's parser recurses per level, so without
# this bound the answer would depend on the recursion limit of the process (torch raises it).
MAX_NESTING = 100


def nesting_depth(pattern: str) -> int:
    """The deepest group nesting, skipping escapes and character classes."""
    depth = deepest = 0
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            if pattern.startswith("]", i + 1) or pattern.startswith("^]", i + 1):
                i += 2 if pattern[i + 1] == "]" else 3  # a leading ] is a literal
                continue
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


def regex_cost(pattern: str) -> RegexCost:
    """Raises re.error for a pattern Python cannot parse, RegexTooComplex for one nested too deeply."""
    depth = nesting_depth(pattern)
    if depth > MAX_NESTING:
        raise RegexTooComplex(f"the regex nests too deeply ({depth} levels of groups; at most {MAX_NESTING})")
    try:
        parsed = sre_parse.parse(pattern)
    except RecursionError:
        raise RegexTooComplex("the regex nests too deeply") from None
    try:
        return _cost(parsed)
    except RecursionError:
        raise RegexTooComplex("the regex nests too deeply") from None


def _class_width(items) -> int:
    width = 0
    negate = False
    for op, av in items:
        if op is _C.NEGATE:
            negate = True
        elif op is _C.LITERAL:
            width += 1
        elif op is _C.RANGE:
            width += av[1] - av[0] + 1
        elif op is _C.CATEGORY:
            width += WIDE_CLASS_CHARS  # \d \w \s: wide enough to count
    return WIDE_CLASS_CHARS if negate else width


def _cost(items) -> RegexCost:
    total = ZERO
    for op, av in items:
        if op in (_C.LITERAL,):
            total += RegexCost(1, 0)
        elif op in (_C.NOT_LITERAL, _C.ANY):
            total += RegexCost(1, 1)
        elif op is _C.IN:
            total += RegexCost(1, int(_class_width(av) >= WIDE_CLASS_CHARS))
        elif op is _C.CATEGORY:
            total += RegexCost(1, 1)
        elif op is _C.SUBPATTERN:
            total += _cost(av[-1])
        elif op is _C.BRANCH:
            for branch in av[1]:
                total += _cost(branch)
        elif op in _REPEATS:
            low, high, item = av
            inner = _cost(item)
            # An unbounded tail loops on one copy; a counted one is spelt out copy by copy.
            copies = max(low, 1) if high == _C.MAXREPEAT else max(high, 1)
            total += inner.times(copies)
        elif hasattr(_C, "ATOMIC_GROUP") and op is _C.ATOMIC_GROUP:
            total += _cost(av)
        # AT (anchors) cost nothing; look-arounds and back-references are refused by outlines-core.
    return total
