"""Tool calling and reasoning output: parsers (vLLM's names), tool_choice planning, streaming deltas."""
from asyncllm.tools.calls import ExtractedToolCalls, ToolCall
from asyncllm.tools.choice import ToolPlan, plan_tools
from asyncllm.tools.parsers import TOOL_PARSERS, ToolParser, get_tool_parser
from asyncllm.tools.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser
from asyncllm.tools.streaming import ChatDeltaStreamer

__all__ = ["ExtractedToolCalls", "ToolCall", "ToolPlan", "plan_tools", "TOOL_PARSERS", "ToolParser", "get_tool_parser",
           "REASONING_PARSERS", "ReasoningParser", "get_reasoning_parser", "ChatDeltaStreamer"]
