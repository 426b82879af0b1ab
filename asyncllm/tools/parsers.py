"""Tool-call parsers for the formats models emit, by vLLM's `--tool-call-parser` names.

Each reads the model's text so far (`parse(text, final)`, see calls.py): while streaming it holds
back what may still turn into a marker; with `final=True` a call that is cut or malformed is
not a call, and its text stays content (never an error). Complete calls before it stay calls.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5/3, Hermes, SmolLM3)
- `llama3_json`: the reply is `{"name": ..., "parameters": {...}}`, several joined by `;`,
  optionally after `<|python_tag|>` (Llama 3.1/3.2)
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the v11 form
  `[TOOL_CALLS]name[ARGS]{...}` (needs special tokens kept in the text)
- `pythonic`: `[get_weather(city="Paris"), f()]` (Llama 3.2 / 4), optionally in `<|python_start|>`
- `required_json` / `NamedToolParser`: the replies `tool_choice="required"` and a named function
  are decoded into (not CLI choices)
"""
from __future__ import annotations

import ast
import json
import re

from asyncllm.tools.calls import (
    ExtractedToolCalls,
    Malformed,
    PartialCall,
    PartialParse,
    ToolCall,
    held_suffix,
    read_call,
    read_call_list,
    scan_value,
    skip_ws,
)


class ToolParser:
    name = ""
    skip_special_tokens = True  # False: the markers are special tokens, kept in the text

    def parse(self, text: str, final: bool) -> PartialParse:
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        parsed = self.parse(text, final=True)
        calls = [ToolCall(c.name, c.arguments) for c in parsed.calls if c.complete and c.name]
        content = parsed.content if parsed.content.strip() or not calls else None
        return ExtractedToolCalls(content, calls)


def _finish(content: str, calls: list[PartialCall], rest: str, final: bool, rest_is_cut_call: bool = True
            ) -> PartialParse:
    """A cut call at the end: streaming keeps it; final drops it and its text (`rest`) goes back
    to content. Where `rest` is the whole list of calls rather than the cut one, it goes back only
    when no complete call is left (a list cut by max_tokens keeps its whole calls)."""
    if final and calls and not calls[-1].complete:
        calls.pop()
        if rest_is_cut_call or not calls:
            content += rest
    return PartialParse(content, calls)


class HermesToolParser(ToolParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> PartialParse:
        content, calls, pos = "", [], 0
        while True:
            i = text.find(self.start, pos)
            if i < 0:
                tail = text[pos:]
                return PartialParse(content + (tail if final else tail[:len(tail) - held_suffix(tail, self.start)]),
                                    calls)
            content += text[pos:i]
            j = skip_ws(text, i + len(self.start))
            if j >= len(text):
                return _finish(content, calls + [PartialCall(None, "")], text[i:], final)
            try:
                call, end = read_call(text, j)
                if end is None:
                    return _finish(content, calls + [call], text[i:], final)
                k = skip_ws(text, end)
                if not text.startswith(self.end, k):
                    if k < len(text) and not self.end.startswith(text[k:]):
                        raise Malformed(f"expected {self.end}")
                    call.complete = False  # the closing tag is still coming
                    return _finish(content, calls + [call], text[i:], final)
            except Malformed:
                return PartialParse(content + text[i:], calls)  # not a call: content from here on
            calls.append(call)
            pos = skip_ws(text, k + len(self.end))  # the whitespace between calls is not content


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> PartialParse:
        i = skip_ws(text, 0)
        if text.startswith(self.tag, i):
            i = skip_ws(text, i + len(self.tag))
        elif not final and self.tag.startswith(text[i:]):
            return PartialParse("")  # blank so far, or the tag arriving
        if i >= len(text):
            return PartialParse(text if final else "")
        if text[i] != "{":
            return PartialParse(text)  # an ordinary reply
        calls: list[PartialCall] = []
        try:
            while True:
                call, end = read_call(text, i)
                calls.append(call)
                if end is None:
                    return _finish("", calls, text[i:], final)
                i = skip_ws(text, end)
                if i >= len(text):
                    return PartialParse("", calls)
                if text[i] != ";":
                    raise Malformed("expected ';' between calls")
                i = skip_ws(text, i + 1)
                if i >= len(text):
                    return PartialParse("", calls)
        except Malformed:
            return PartialParse(text, []) if not calls or not calls[0].complete else \
                PartialParse(text[i:], [c for c in calls if c.complete])


class MistralToolParser(ToolParser):
    name = "mistral"
    skip_special_tokens = False
    marker = "[TOOL_CALLS]"
    args_marker = "[ARGS]"

    def parse(self, text: str, final: bool) -> PartialParse:
        i = text.find(self.marker)
        if i < 0:
            return PartialParse(text if final else text[:len(text) - held_suffix(text, self.marker)])
        content = text[:i]
        j = skip_ws(text, i + len(self.marker))
        if j >= len(text):
            return _finish(content, [PartialCall(None, "")], text[i:], final)
        try:
            if text[j] == "[":
                calls, _ = read_call_list(text, j)
                return _finish(content, calls, text[i:], final, rest_is_cut_call=False)
            return _finish(content, self._v11(text, j), text[i:], final)
        except Malformed:
            return PartialParse(text, [])

    def _v11(self, text: str, j: int) -> list[PartialCall]:
        """name[ARGS]{...}, repeated (each after its own [TOOL_CALLS])."""
        calls: list[PartialCall] = []
        while j < len(text):
            a = text.find(self.args_marker, j)
            if a < 0:
                head = re.match(r"[\w.-]*", text[j:])
                if not self.args_marker.startswith(text[j + head.end():]):
                    raise Malformed("expected name[ARGS]")
                calls.append(PartialCall(None, ""))
                return calls
            name = text[j:a].strip()
            if not re.fullmatch(r"[\w.-]+", name):
                raise Malformed("not a tool name")
            start = skip_ws(text, a + len(self.args_marker))
            end = scan_value(text, start) if start < len(text) else None
            call = PartialCall(name, text[start:len(text) if end is None else end])
            calls.append(call)
            if end is None:
                return calls
            if not isinstance(json.loads(call.arguments), dict):
                raise Malformed("the arguments are not a JSON object")
            call.complete = True
            j = skip_ws(text, end)
            if text.startswith(self.marker, j):
                j = skip_ws(text, j + len(self.marker))
            elif j < len(text):
                raise Malformed("text after the tool calls")
        return calls


class RequiredJsonToolParser(ToolParser):
    """The array `tool_choice="required"` is decoded under: [{"name": ..., "parameters": {...}}]."""

    name = "required_json"

    def parse(self, text: str, final: bool) -> PartialParse:
        i = skip_ws(text, 0)
        if i >= len(text):
            return PartialParse("")
        try:
            calls, _ = read_call_list(text, i)
        except Malformed:
            return PartialParse(text, [])
        return _finish("", calls, text, final, rest_is_cut_call=False)


class NamedToolParser(ToolParser):
    """tool_choice naming one function: the whole reply is its arguments (decoded under its schema)."""

    name = "named"

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool) -> PartialParse:
        stripped = text.strip()
        if final:
            try:
                complete = isinstance(json.loads(stripped), dict)
            except ValueError:
                complete = False
            if not complete:
                return PartialParse(text)
            return PartialParse("", [PartialCall(self.function, stripped, complete=True)])
        return PartialParse("", [PartialCall(self.function, text.lstrip())])


class PythonicToolParser(ToolParser):
    name = "pythonic"
    start, end = "<|python_start|>", "<|python_end|>"
    _HEAD = re.compile(r"\s*\[\s*([A-Za-z_][\w.]*)?\s*$")

    def parse(self, text: str, final: bool) -> PartialParse:
        body = text.strip()
        if body.startswith(self.start):
            body = body[len(self.start):].removesuffix(self.end).strip()
        elif not final and body and self.start.startswith(body):
            return PartialParse("")
        if not body.startswith("["):
            return PartialParse(text if final or body else "")
        calls: list[PartialCall] = []
        depth, quote, call_start, i = 0, "", None, 1
        while i < len(body):
            ch = body[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch in "([{":
                if depth == 0 and ch == "(":
                    call_start = body.rfind(",", 0, i) + 1 if calls else 1
                    name = body[call_start:i].strip()
                    if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
                        return PartialParse(text)
                    calls.append(PartialCall(name, ""))
                depth += 1
            elif ch in ")]}":
                if depth == 0:
                    if ch != "]":
                        return PartialParse(text)
                    return self._whole(text, calls)
                depth -= 1
                if depth == 0 and ch == ")":
                    try:
                        calls[-1] = self._call(body[call_start:i + 1])
                    except (SyntaxError, ValueError):
                        return PartialParse(text)
            i += 1
        if final or (not calls and not self._HEAD.match(body)):
            return PartialParse(text)  # no closing ']', or '[' then something that is not a call
        return PartialParse("", calls)

    @staticmethod
    def _whole(text: str, calls: list[PartialCall]) -> PartialParse:
        if not calls or not all(c.complete for c in calls):
            return PartialParse(text)
        return PartialParse("", calls)

    @staticmethod
    def _call(source: str) -> PartialCall:
        node = ast.parse(source.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError("a call with keyword arguments only")
        name = ast.unparse(node.func)
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        if None in arguments:
            raise ValueError("**kwargs")
        return PartialCall(name, json.dumps(arguments, ensure_ascii=False), complete=True)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}") \
            from None
