"""AsyncLLMCompletion: a LangChain text-completion LLM backed by asyncllm."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk

from asyncllm.backends import iterate_sync, run_sync
from langchain_asyncllm._common import AsyncLLMFields


class AsyncLLMCompletion(AsyncLLMFields, LLM):
    """Completion model on asyncllm (the prompt is continued as is, no chat template)."""

    @property
    def _llm_type(self) -> str:
        return "asyncllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature}

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        stream = self.backend().stream(prompt, self.options(stop, kwargs))
        try:
            async for delta in stream:
                if delta.text:
                    chunk = GenerationChunk(text=delta.text)
                    if run_manager:
                        await run_manager.on_llm_new_token(delta.text, chunk=chunk)
                    yield chunk
                if delta.finish_reason is not None:
                    yield GenerationChunk(text="", generation_info={"finish_reason": delta.finish_reason})
        finally:
            await stream.aclose()

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return "".join([c.text async for c in self._astream(prompt, stop, run_manager, **kwargs)])

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        options = self.options(stop, kwargs)
        for delta in iterate_sync(lambda: self.backend().stream(prompt, options)):
            if delta.text:
                chunk = GenerationChunk(text=delta.text)
                if run_manager:
                    run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return run_sync(lambda: self._acall(prompt, stop, None, **kwargs))
