"""ChatAsyncLLM: a LangChain chat model backed by asyncllm (in-process engine or remote server)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCall, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel
from pydantic.v1 import BaseModel as BaseModelV1

from asyncllm.backends import Delta, iterate_sync, run_sync
from langchain_asyncllm._common import AsyncLLMFields


_CALL_BLOCKS = ("tool_use", "tool_call", "function_call")  # also in AIMessage.tool_calls, rendered from there


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in _CALL_BLOCKS:
            continue
        else:
            raise ValueError("asyncllm chat models accept text content only")
    return "".join(parts)


def _openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)}}


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI chat messages (assistant tool calls and tool results included)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"content": _text(m.content)}
        if isinstance(m, SystemMessage):
            message["role"] = "system"
        elif isinstance(m, HumanMessage):
            message["role"] = "user"
        elif isinstance(m, AIMessage):
            message["role"] = "assistant"
            if m.tool_calls:
                message["tool_calls"] = [_openai_call(call) for call in m.tool_calls]
        elif isinstance(m, ToolMessage):
            message.update(role="tool", tool_call_id=m.tool_call_id)
        elif isinstance(m, ChatMessage):
            message["role"] = m.role
        else:
            raise ValueError(f"unsupported message type {type(m).__name__}")
        out.append(message)
    return out


def openai_tool_choice(tool_choice: Any) -> Any:
    """LangChain's tool_choice values in OpenAI's terms: "any" and True force some tool; another
    string names the tool to call."""
    if tool_choice is None or isinstance(tool_choice, dict) or tool_choice in ("auto", "none", "required"):
        return tool_choice
    if tool_choice is True or tool_choice == "any":
        return "required"
    if tool_choice is False:
        return "none"
    if isinstance(tool_choice, str):
        return {"type": "function", "function": {"name": tool_choice}}
    raise ValueError(f"unsupported tool_choice {tool_choice!r}")


class ChatAsyncLLM(AsyncLLMFields, BaseChatModel):
    """Chat model on asyncllm.

    In-process: `ChatAsyncLLM(engine=AsyncEngine.from_args())`.
    Remote: `ChatAsyncLLM(base_url="http://127.0.0.1:8000", api_key="...")`.
    """

    @property
    def _llm_type(self) -> str:
        return "asyncllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "asyncllm"
        params["ls_model_name"] = kwargs.get("model") or self.model or "asyncllm"
        return params

    # -- async (native)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        stream = self.backend().stream(to_chat_messages(messages), self.options(stop, kwargs))
        try:
            async for delta in stream:
                chunk = self._chunk(delta)
                if run_manager and delta.text:
                    await run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk
        finally:
            await stream.aclose()  # an abandoned consumer aborts the request

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        final: ChatGenerationChunk | None = None
        async for chunk in self._astream(messages, stop, run_manager, **kwargs):
            final = chunk if final is None else final + chunk
        return self._result(final)

    # -- sync (the async path run from this thread)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        options = self.options(stop, kwargs)
        chat = to_chat_messages(messages)
        for delta in iterate_sync(lambda: self.backend().stream(chat, options)):
            chunk = self._chunk(delta)
            if run_manager and delta.text:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return run_sync(lambda: self._agenerate(messages, stop, None, **kwargs))

    # -- helpers

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools (pydantic models, functions, LangChain tools or OpenAI dicts) offered to the model.

        `tool_choice`: "auto" (the model decides; its reply is read by the tool-call parser),
        "any"/"required"/True (some tool is called: decoded under the tools' JSON schemas, so the
        arguments always validate), a tool's name (that tool), "none", or an OpenAI dict.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        bound: dict[str, Any] = {"tools": formatted, **kwargs}
        if tool_choice is not None:
            bound["tool_choice"] = openai_tool_choice(tool_choice)
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound)

    def _chunk(self, delta: Delta) -> ChatGenerationChunk:
        tool_call_chunks = [tool_call_chunk(name=(t.get("function") or {}).get("name"),
                                            args=(t.get("function") or {}).get("arguments"), id=t.get("id"),
                                            index=t.get("index")) for t in delta.tool_calls or []]
        if delta.finish_reason is None and delta.prompt_tokens is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text, tool_call_chunks=tool_call_chunks))
        usage = None
        if delta.prompt_tokens is not None:
            usage = UsageMetadata(input_tokens=delta.prompt_tokens, output_tokens=delta.completion_tokens or 0,
                                  total_tokens=delta.prompt_tokens + (delta.completion_tokens or 0))
        metadata = {"finish_reason": delta.finish_reason, "model_name": delta.model or self.resolved_model_name(),
                    "model_provider": "asyncllm"}
        return ChatGenerationChunk(message=AIMessageChunk(content=delta.text, usage_metadata=usage,
                                                          tool_call_chunks=tool_call_chunks,
                                                          response_metadata=metadata, chunk_position="last"),
                                   generation_info={"finish_reason": delta.finish_reason})

    @staticmethod
    def _result(final: ChatGenerationChunk | None) -> ChatResult:
        if final is None:
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=""))])
        message = final.message
        ai = AIMessage(content=message.content, usage_metadata=message.usage_metadata,
                       response_metadata=message.response_metadata, id=message.id,
                       tool_calls=message.tool_calls, invalid_tool_calls=message.invalid_tool_calls)
        return ChatResult(generations=[ChatGeneration(message=ai, generation_info=final.generation_info)])

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: str = "json_schema", strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """Output parsed into `schema`: a pydantic model class (→ instances), a TypedDict or a
        JSON schema / OpenAI tool dict (→ dicts).

        `method`: "json_schema" (the answer is decoded under the schema), "function_calling" (the
        schema becomes a tool the model is made to call, decoded under its parameters: the
        arguments are the output) or "json_mode" (decoded under the schema too, which keeps json
        mode's promise that the JSON parses into it). `strict` is accepted for compatibility:
        decoding always follows the schema exactly.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"unknown method {method!r}")
        is_model = isinstance(schema, type) and issubclass(schema, (BaseModel, BaseModelV1))
        structured_format = {"kwargs": {"method": method, "strict": strict}, "schema": convert_to_json_schema(schema)}
        parser: Runnable
        if method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            bound = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=structured_format)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_model
                      else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True))
        else:
            bound = self.bind(json_schema=_json_schema(schema), ls_structured_output_format=structured_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
        if not include_raw:
            return bound | parser
        parse = RunnablePassthrough.assign(parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None)
        return RunnableMap(raw=bound) | parse


def _json_schema(schema: Any) -> dict:
    """A JSON schema from a pydantic (v1 or v2) model, a TypedDict, a JSON schema or an OpenAI tool dict."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, dict) and "parameters" in schema and "name" in schema:
        return schema["parameters"]  # an OpenAI function description
    if isinstance(schema, dict) and "function" in schema:
        return schema["function"]["parameters"]  # an OpenAI tool description
    if isinstance(schema, dict) and ("type" in schema or "properties" in schema or "$defs" in schema):
        return schema
    if isinstance(schema, str):
        return json.loads(schema)
    converted = convert_to_json_schema(schema)
    return {k: v for k, v in converted.items() if k not in ("title",)} | {"title": converted.get("title", "output")}
