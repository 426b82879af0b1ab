"""ChatAsyncLLM: a LangChain chat model backed by asyncllm (in-process engine or remote server)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
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
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel
from pydantic.v1 import BaseModel as BaseModelV1

from asyncllm.backends import Delta, iterate_sync, run_sync
from langchain_asyncllm._common import AsyncLLMFields


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            raise ValueError("asyncllm chat models accept text content only")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, ToolMessage):
            role = "tool"
        elif isinstance(m, ChatMessage):
            role = m.role
        else:
            raise ValueError(f"unsupported message type {type(m).__name__}")
        out.append({"role": role, "content": _text(m.content)})
    return out


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

    def _chunk(self, delta: Delta) -> ChatGenerationChunk:
        if delta.finish_reason is None and delta.prompt_tokens is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
        usage = None
        if delta.prompt_tokens is not None:
            usage = UsageMetadata(input_tokens=delta.prompt_tokens, output_tokens=delta.completion_tokens or 0,
                                  total_tokens=delta.prompt_tokens + (delta.completion_tokens or 0))
        metadata = {"finish_reason": delta.finish_reason, "model_name": delta.model or self.resolved_model_name(),
                    "model_provider": "asyncllm"}
        return ChatGenerationChunk(message=AIMessageChunk(content=delta.text, usage_metadata=usage,
                                                          response_metadata=metadata, chunk_position="last"),
                                   generation_info={"finish_reason": delta.finish_reason})

    @staticmethod
    def _result(final: ChatGenerationChunk | None) -> ChatResult:
        if final is None:
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=""))])
        message = final.message
        ai = AIMessage(content=message.content, usage_metadata=message.usage_metadata,
                       response_metadata=message.response_metadata, id=message.id)
        return ChatResult(generations=[ChatGeneration(message=ai, generation_info=final.generation_info)])

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: str = "json_schema", strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """Output constrained by the engine's JSON-schema decoding, parsed into `schema`.

        `schema`: a pydantic model class (→ instances) or a JSON schema dict (→ dicts).
        `method`: "json_schema" (and "function_calling", served the same way: there is no
        tool calling, the schema constrains the answer) or "json_mode" (any JSON object).
        `strict` is accepted for compatibility: decoding always follows the schema exactly.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"unknown method {method!r}")
        is_model = isinstance(schema, type) and issubclass(schema, (BaseModel, BaseModelV1))
        # json_mode promises JSON parsed into `schema`: constraining to the schema keeps that promise.
        bound = self.bind(json_schema=_json_schema(schema), ls_structured_output_format={
            "kwargs": {"method": method, "strict": strict}, "schema": convert_to_json_schema(schema)})
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
