"""Tool calls as the parsers see them: whole (`ToolCall`) and as text that is still arriving.

A parser reads the model's text so far into a `PartialParse`: the content that is safe to show
(never the start of a tool-call marker that may still complete) and the calls begun so far,
each with its name once known and the raw JSON text of its arguments so far. The same reading
with `final=True` gives the response of a non-streamed request, so streamed deltas always
reassemble to it. `read_call` reads one `{"name": ..., "arguments": {...}}` object that may be
cut anywhere.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as the model wrote it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class PartialCall:
    name: str | None  # None until its string is complete
    arguments: str  # raw JSON text of the arguments so far (a prefix of the final text)
    complete: bool = False  # the call's text is whole and its arguments are a JSON object


@dataclass
class PartialParse:
    content: str  # text outside tool calls that is safe to emit
    calls: list[PartialCall] = field(default_factory=list)


@dataclass
class ExtractedToolCalls:
    content: str | None  # None when the text held only tool calls
    calls: list[ToolCall]


class Malformed(ValueError):
    """The text cannot become what the parser expects, however it continues."""


_WS = " \t\r\n"
_LITERAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null")


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def held_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back: it may become it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def scan_string(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON string starting at text[i] == '"'; None if it is cut."""
    i += 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    return None


def scan_value(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at text[i]; None if it is cut; Malformed if
    no continuation can make it one."""
    if i >= len(text):
        return None
    ch = text[i]
    if ch == '"':
        return scan_string(text, i)
    if ch in "{[":
        stack = [ch]
        j = i + 1
        while j < len(text):
            c = text[j]
            if c == '"':
                end = scan_string(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                stack.append(c)
            elif c in "}]":
                if {"{": "}", "[": "]"}[stack.pop()] != c:
                    raise Malformed(f"mismatched {c!r}")
                if not stack:
                    return j + 1
            j += 1
        return None
    match = _LITERAL.match(text, i)
    if match is None or match.end() == len(text):
        rest = text[i:]
        if match is None and not any(word.startswith(rest) for word in ("true", "false", "null")) \
                and not re.fullmatch(r"-?[0-9.eE+-]*", rest):
            raise Malformed(f"not a JSON value at {rest[:20]!r}")
        return None  # a literal or number that may go on
    return match.end()


def _arguments_text(raw: str) -> str:
    """The arguments' JSON object text: as written, or decoded when the model wrote it as a string."""
    value = json.loads(raw)
    if isinstance(value, str):
        raw, value = value, json.loads(value)
    if not isinstance(value, dict):
        raise Malformed("the arguments are not a JSON object")
    return raw


def read_call(text: str, i: int, name_keys: tuple[str, ...] = ("name",),
              argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[PartialCall, int | None]:
    """The call object at text[i] ('{'), and where it ends (None: cut). Malformed if it cannot be one."""
    if text[i] != "{":
        raise Malformed("a tool call must be a JSON object")
    call = PartialCall(None, "")
    has_arguments = False
    j = skip_ws(text, i + 1)
    while True:
        if j >= len(text):
            return call, None
        if text[j] == "}":
            break
        if text[j] != '"':
            raise Malformed("expected a key")
        key_end = scan_string(text, j)
        if key_end is None:
            return call, None
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text):
            return call, None
        if text[j] != ":":
            raise Malformed("expected ':'")
        start = skip_ws(text, j + 1)
        end = scan_value(text, start)
        if key in name_keys:
            if end is not None:
                name = json.loads(text[start:end])
                if not isinstance(name, str) or not name:
                    raise Malformed("the tool name must be a non-empty string")
                call.name = name
        elif key in argument_keys:
            has_arguments = True
            raw = text[start:len(text) if end is None else end]
            # A string-encoded object is only shown once whole (its escapes are not the final text).
            call.arguments = raw if not raw.startswith('"') else (_arguments_text(raw) if end is not None else "")
        if end is None:
            return call, None
        j = skip_ws(text, end)
        if j >= len(text):
            return call, None
        if text[j] == ",":
            j = skip_ws(text, j + 1)
        elif text[j] != "}":
            raise Malformed("expected ',' or '}'")
    if call.name is None:
        raise Malformed("the tool call has no name")
    call.arguments = _arguments_text(call.arguments) if has_arguments else "{}"
    call.complete = True
    return call, j + 1


def read_call_list(text: str, i: int, name_keys: tuple[str, ...] = ("name",),
                   argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[list[PartialCall], int | None]:
    """A JSON array of call objects at text[i] ('['), and where it ends (None: cut)."""
    if text[i] != "[":
        raise Malformed("expected a JSON array of tool calls")
    calls: list[PartialCall] = []
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "]" and not calls:
            return calls, j + 1
        call, end = read_call(text, j, name_keys, argument_keys)
        calls.append(call)
        if end is None:
            return calls, None
        j = skip_ws(text, end)
        if j >= len(text):
            return calls, None
        if text[j] == "]":
            return calls, j + 1
        if text[j] != ",":
            raise Malformed("expected ',' or ']' between tool calls")
        j = skip_ws(text, j + 1)
    return calls, None
