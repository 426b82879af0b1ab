"""LangChain integration for asyncllm (chat model and completion LLM)."""
from langchain_asyncllm.chat_models import ChatAsyncLLM
from langchain_asyncllm.llms import AsyncLLMCompletion

__all__ = ["ChatAsyncLLM", "AsyncLLMCompletion"]
