"""AsyncLLM: a LlamaIndex LLM on asyncllm, with native async methods (no sync wrappers in threads)."""
from __future__ import annotations

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
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM

from asyncllm.backends import Backend, Delta, GenerationOptions, iterate_sync, make_backend, run_sync

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
          MessageRole.ASSISTANT: "assistant", MessageRole.TOOL: "tool", MessageRole.CHATBOT: "assistant",
          MessageRole.MODEL: "assistant", MessageRole.FUNCTION: "tool"}


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": _ROLES.get(m.role, "user"), "content": m.content or ""} for m in messages]


class AsyncLLM(LLM):
    """`AsyncLLM(engine=AsyncEngine.from_args())` in-process, or `AsyncLLM(base_url=..., api_key=...)`."""

    engine: Any = Field(default=None, exclude=True, description="an asyncllm AsyncEngine in this process")
    base_url: str | None = Field(default=None, description="or the base URL of an asyncllm server")
    api_key: str | None = Field(default=None, exclude=True)
    temperature: float | None = None
    max_tokens: int | None = Field(default=256, description="tokens to generate (num_output)")
    top_p: float | None = None
    seed: int | None = None
    additional_kwargs: dict[str, Any] = Field(default_factory=dict, description="other SamplingParams fields")

    _backend: Backend | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "AsyncLLM"

    def _get_backend(self) -> Backend:
        if self._backend is None:
            self._backend = make_backend(self.engine, self.base_url, self.api_key)
        return self._backend

    @property
    def metadata(self) -> LLMMetadata:
        backend = self._get_backend()
        return LLMMetadata(context_window=backend.context_window, num_output=self.max_tokens or -1,
                           is_chat_model=True, model_name=backend.model_name)

    def _options(self, kwargs: dict[str, Any]) -> GenerationOptions:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("formatted",)}
        return GenerationOptions(max_tokens=kwargs.pop("max_tokens", self.max_tokens),
                                 temperature=kwargs.pop("temperature", self.temperature),
                                 top_p=kwargs.pop("top_p", self.top_p), seed=kwargs.pop("seed", self.seed),
                                 stop=kwargs.pop("stop", None), json_schema=kwargs.pop("json_schema", None),
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
        text, raw = await _collect(self._deltas(_messages(messages), kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=raw)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen():
            text = ""
            async for delta in self._deltas(_messages(messages), kwargs):
                text += delta.text
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta.text,
                                   raw=_raw(delta))

        return gen()

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
        text, raw = run_sync(lambda: _collect(self._deltas(_messages(messages), kwargs)))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=raw)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        chat = _messages(messages)

        def gen():
            text = ""
            for delta in iterate_sync(lambda: self._deltas(chat, kwargs)):
                text += delta.text
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta.text,
                                   raw=_raw(delta))

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
