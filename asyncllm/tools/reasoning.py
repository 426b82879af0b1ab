"""Reasoning parsers (vLLM's `--reasoning-parser`): `<think>…</think>` moves to `reasoning_content`.

- `deepseek_r1`: the reasoning runs up to `</think>`; the opening tag is optional (R1's
  template puts it in the prompt). A reply without `</think>` is all reasoning (cut short).
- `qwen3`: only a reply that opens with `<think>` has reasoning (up to `</think>`, or all of it
  when cut short); with
  `chat_template_kwargs={"enable_thinking": false}` Qwen3 answers without it (all content).
"""
from __future__ import annotations

from asyncllm.tools.calls import held_suffix


class ReasoningParser:
    name = ""
    start, end = "<think>", "</think>"
    start_optional = False

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of the text so far; while streaming, what may still be a tag is held."""
        body = text.lstrip()
        opened = body.startswith(self.start)
        if not opened and not final and self.start.startswith(body):
            return "", ""  # blank, or the opening tag arriving
        if opened:
            body = body[len(self.start):]
        elif not self.start_optional:
            return "", text
        close = body.find(self.end)
        if close >= 0:
            return body[:close].lstrip("\n"), body[close + len(self.end):].lstrip("\n")
        # No closing tag yet: all reasoning so far (streaming holds what may be the tag's start).
        kept = body if final else body[:len(body) - held_suffix(body, self.end)]
        return kept.lstrip("\n"), ""

    def extract(self, text: str) -> tuple[str | None, str]:
        reasoning, content = self.split(text, final=True)
        return (reasoning or None), content


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    start_optional = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(sorted(REASONING_PARSERS))}") \
            from None
