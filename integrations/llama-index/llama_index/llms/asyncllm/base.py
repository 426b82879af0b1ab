"""AsyncLLM: a LlamaIndex function-calling LLM on asyncllm, with native async methods (no sync
wrappers in threads). Tool calls travel as `ToolCallBlock`s in the assistant message (and tool
results as `tool` messages with `additional_kwargs["tool_call_id"]`), as FunctionAgent expects;
structured prediction decodes under the output class's JSON schema in the engine."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from asyncllm.backends import Backend, Delta, GenerationOptions, iterate_sync, make_backend, run_sync

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
          MessageRole.ASSISTANT: "assistant", MessageRole.TOOL: "tool", MessageRole.CHATBOT: "assistant",
          MessageRole.MODEL: "assistant", MessageRole.FUNCTION: "tool"}


def _openai_calls(m: ChatMessage) -> list[dict[str, Any]]:
    calls = [{"id": b.tool_call_id or "", "type": "function",
              "function": {"name": b.tool_name, "arguments": b.tool_kwargs if isinstance(b.tool_kwargs, str)
                           else json.dumps(b.tool_kwargs, ensure_ascii=False)}}
             for b in m.blocks if isinstance(b, ToolCallBlock)]
    return calls or list(m.additional_kwargs.get("tool_calls") or [])


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as OpenAI chat messages (assistant tool calls and tool results included)."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": _ROLES.get(m.role, "user"), "content": m.content or ""}
        if message["role"] == "assistant" and (calls := _openai_calls(m)):
            message["tool_calls"] = calls
        if message["role"] == "tool" and "tool_call_id" in m.additional_kwargs:
            message["tool_call_id"] = m.additional_kwargs["tool_call_id"]
        out.append(message)
    return out


class _Reply:
    """An assistant reply as it streams: its text and its tool calls (OpenAI delta fragments merged by index)."""

    def __init__(self):
        self.text = ""
        self.calls: list[dict[str, str]] = []

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        for fragment in delta.tool_calls or []:
            while len(self.calls) <= fragment["index"]:
                self.calls.append({"id": "", "name": "", "arguments": ""})
            call, function = self.calls[fragment["index"]], fragment.get("function") or {}
            call["id"] = fragment.get("id") or call["id"]
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def message(self) -> ChatMessage:
        blocks: list[Any] = [TextBlock(text=self.text)] if self.text or not self.calls else []
        blocks += [ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"])
                   for c in self.calls]
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


def _tool_choice(tool_choice: Any, tool_required: bool) -> Any:
    """LlamaIndex passes a tool's name (FunctionAgent's initial_tool_choice) or OpenAI's values."""
    if tool_choice is None:
        return "required" if tool_required else "auto"
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        return {"type": "function", "function": {"name": tool_choice}}
    return tool_choice


class AsyncLLM(FunctionCallingLLM):
    """`AsyncLLM(engine=AsyncEngine.from_args())` in-process, or `AsyncLLM(base_url=..., api_key=...)`."""

    engine: Any = Field(default=None, exclude=True, description="an asyncllm AsyncEngine in this process")
    base_url: str | None = Field(default=None, description="or the base URL of an asyncllm server")
    api_key: str | None = Field(default=None, exclude=True)
    model: str | None = Field(default=None, description=(
        "remote: the served model or LoRA adapter (a name from the server's --lora-modules); None: its first"))
    lora_request: Any = Field(default=None, exclude=True, description=(
        "in process: the asyncllm.LoRARequest every call runs with (a call's lora_request= overrides it)"))
    temperature: float | None = None
    max_tokens: int | None = Field(default=256, description="tokens to generate (num_output)")
    top_p: float | None = None
    seed: int | None = None
    additional_kwargs: dict[str, Any] = Field(default_factory=dict, description="other SamplingParams fields")
    tool_call_parser: str | None = Field(default=None, description=(
        "in process: how free ('auto') replies are read for tool calls (hermes, llama3_json, mistral, pythonic); "
        "None: the format the model's chat template teaches"))

    _backend: Backend | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "AsyncLLM"

    def _get_backend(self) -> Backend:
        if self._backend is None:
            self._backend = make_backend(self.engine, self.base_url, self.api_key, self.tool_call_parser,
                                         model=self.model if self.engine is None else None)
        return self._backend

    @property
    def metadata(self) -> LLMMetadata:
        backend = self._get_backend()
        return LLMMetadata(context_window=backend.context_window, num_output=self.max_tokens or -1,
                           is_chat_model=True, is_function_calling_model=True, model_name=backend.model_name)

    def _options(self, kwargs: dict[str, Any]) -> GenerationOptions:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("formatted",)}
        return GenerationOptions(max_tokens=kwargs.pop("max_tokens", self.max_tokens),
                                 temperature=kwargs.pop("temperature", self.temperature),
                                 top_p=kwargs.pop("top_p", self.top_p), seed=kwargs.pop("seed", self.seed),
                                 stop=kwargs.pop("stop", None), json_schema=kwargs.pop("json_schema", None),
                                 tools=kwargs.pop("tools", None), tool_choice=kwargs.pop("tool_choice", None),
                                 parallel_tool_calls=kwargs.pop("parallel_tool_calls", None),
                                 lora_request=kwargs.pop("lora_request", self.lora_request),
                                 model=kwargs.pop("model", None),
                                 extra={**self.additional_kwargs, **kwargs})

    # ------------------------------------------------------------------ async (native)

    async def _deltas(self, prompt, kwargs) -> AsyncIterator[Delta]:
        stream = self._get_backend().stream(prompt, self._options(kwargs))
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()  # a consumer that stops early aborts the request

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, raw = await _collect(self._deltas(prompt, kwargs))
        return CompletionResponse(text=text, raw=raw)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen():
            text = ""
            async for delta in self._deltas(prompt, kwargs):
                text += delta.text
                yield CompletionResponse(text=text, delta=delta.text, raw=_raw(delta))

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._reply(messages, kwargs)

    async def _reply(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        reply, raw = _Reply(), {}
        async for delta in self._deltas(_messages(messages), kwargs):
            reply.add(delta)
            raw = _raw(delta) or raw
        return ChatResponse(message=reply.message(), raw=raw)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen():
            reply = _Reply()
            async for delta in self._deltas(_messages(messages), kwargs):
                reply.add(delta)
                yield ChatResponse(message=reply.message(), delta=delta.text, raw=_raw(delta))

        return gen()

    # ------------------------------------------------------------------ tools and structured output

    def _prepare_chat_with_tools(self, tools: Sequence[Any], user_msg: str | ChatMessage | None = None,
                                 chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 tool_choice: Any = None, **kwargs: Any) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        if not tools:
            return {"messages": messages, **kwargs}
        return {"messages": messages, "tools": [t.metadata.to_openai_tool() for t in tools],
                "tool_choice": _tool_choice(tool_choice, tool_required),
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The calls in a reply; a call whose arguments are not (yet) a JSON object has none."""
        selections = []
        for block in response.message.blocks:
            if isinstance(block, ToolCallBlock):
                arguments = block.tool_kwargs
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        arguments = {}
                selections.append(ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                                                tool_kwargs=arguments if isinstance(arguments, dict) else {}))
        if not selections and error_on_no_tool_call:
            raise ValueError(f"expected at least one tool call in the reply, got: {response.message.content!r}")
        return selections

    async def astructured_predict(self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None,
                                  **prompt_args: Any) -> Any:
        """The reply decoded under `output_cls`'s JSON schema in the engine, so it always validates."""
        messages = prompt.format_messages(llm=self, **prompt_args)
        response = await self.achat(messages, json_schema=output_cls.model_json_schema(), **(llm_kwargs or {}))
        return output_cls.model_validate_json(response.message.content or "")

    def structured_predict(self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None,
                           **prompt_args: Any) -> Any:
        return run_sync(lambda: self.astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args))

    # ------------------------------------------------------------------ sync

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, raw = run_sync(lambda: _collect(self._deltas(prompt, kwargs)))
        return CompletionResponse(text=text, raw=raw)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen():
            text = ""
            for delta in iterate_sync(lambda: self._deltas(prompt, kwargs)):
                text += delta.text
                yield CompletionResponse(text=text, delta=delta.text, raw=_raw(delta))

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return run_sync(lambda: self._reply(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        chat = _messages(messages)

        def gen():
            reply = _Reply()
            for delta in iterate_sync(lambda: self._deltas(chat, kwargs)):
                reply.add(delta)
                yield ChatResponse(message=reply.message(), delta=delta.text, raw=_raw(delta))

        return gen()


def _raw(delta: Delta) -> dict[str, Any]:
    if delta.finish_reason is None and delta.prompt_tokens is None:
        return {}
    return {"finish_reason": delta.finish_reason, "usage": {"prompt_tokens": delta.prompt_tokens,
                                                            "completion_tokens": delta.completion_tokens}}


async def _collect(deltas: AsyncIterator[Delta]) -> tuple[str, dict[str, Any]]:
    text, raw = "", {}
    async for delta in deltas:
        text += delta.text
        raw = _raw(delta) or raw
    return text, raw
