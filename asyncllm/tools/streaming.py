"""Streamed chat deltas in OpenAI's shape from the model's text so far.

`ChatDeltaStreamer` keeps, per choice, what it has sent: it re-reads the whole text at each
step (reasoning first, then tool calls) and sends only what grew: `reasoning_content`,
`content`, and `tool_calls[i]` entries (the first with id, type and name, then fragments of
`function.arguments`). Re-reading costs a scan of the text per delta, a few microseconds for a
reply; it is what makes the streamed pieces add up to the non-streamed message exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from asyncllm.tools.calls import PartialParse, new_call_id
from asyncllm.tools.parsers import ToolParser
from asyncllm.tools.reasoning import ReasoningParser


@dataclass
class _Sent:
    reasoning: int = 0
    content: int = 0
    call_ids: list[str] = field(default_factory=list)
    arguments: list[int] = field(default_factory=list)


class ChatDeltaStreamer:
    def __init__(self, tool_parser: ToolParser | None, reasoning_parser: ReasoningParser | None):
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser
        self.sent = _Sent()

    @property
    def called_tools(self) -> bool:
        return bool(self.sent.call_ids)

    def delta(self, text: str, final: bool = False) -> dict:
        """The delta to send now for the text so far (empty dict: nothing new)."""
        sent, out = self.sent, {}
        reasoning, content = "", text
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.split(text, final)
        if len(reasoning) > sent.reasoning:
            out["reasoning_content"] = reasoning[sent.reasoning:]
            sent.reasoning = len(reasoning)
        parsed = PartialParse(content) if self.tool_parser is None else self.tool_parser.parse(content, final)
        if len(parsed.content) > sent.content:
            out["content"] = parsed.content[sent.content:]
            sent.content = len(parsed.content)
        tool_deltas = []
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if index == len(sent.call_ids):
                sent.call_ids.append(new_call_id())
                sent.arguments.append(len(call.arguments))
                tool_deltas.append({"index": index, "id": sent.call_ids[index], "type": "function",
                                    "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > sent.arguments[index]:
                tool_deltas.append({"index": index, "function": {"arguments": call.arguments[sent.arguments[index]:]}})
                sent.arguments[index] = len(call.arguments)
        if tool_deltas:
            out["tool_calls"] = tool_deltas
        return out
