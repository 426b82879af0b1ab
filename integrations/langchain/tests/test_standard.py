"""LangChain's standard test suites for ChatAsyncLLM, in-process on the default model.

Skips come from the suites' own capability flags (tool calling, images, audio, PDFs:
things this text-only local model does not have), each with the suite's stated reason.
"""
from __future__ import annotations

import functools

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_asyncllm import ChatAsyncLLM


@functools.lru_cache(maxsize=1)
def shared_engine():
    from asyncllm import AsyncEngine

    return AsyncEngine.from_args(dtype="float32", max_num_seqs=16)


class TestChatAsyncLLMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatAsyncLLM]:
        return ChatAsyncLLM

    @property
    def chat_model_params(self) -> dict:
        # Construction only: the backend connects lazily, on first use.
        return {"base_url": "http://127.0.0.1:9", "model": "SmolLM2-135M-Instruct"}


class TestChatAsyncLLMIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatAsyncLLM]:
        return ChatAsyncLLM

    @property
    def chat_model_params(self) -> dict:
        # A 135M model decoding greedily tends to loop inside long strings; a repetition penalty
        # (an ordinary sampling setting) lets it close the JSON the structured tests ask for.
        return {"engine": shared_engine(), "model": "SmolLM2-135M-Instruct", "max_tokens": 100, "temperature": 0,
                "model_kwargs": {"repetition_penalty": 1.3}}

    @property
    def has_tool_calling(self) -> bool:
        return False  # not built yet: the suite skips tool tests with its own reason

    @property
    def supports_json_mode(self) -> bool:
        return True
