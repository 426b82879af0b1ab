"""LangChain integration for asyncllm (chat model, completion LLM, embeddings)."""
from langchain_asyncllm.chat_models import ChatAsyncLLM
from langchain_asyncllm.embeddings import AsyncLLMEmbeddings
from langchain_asyncllm.llms import AsyncLLMCompletion

__all__ = ["ChatAsyncLLM", "AsyncLLMCompletion", "AsyncLLMEmbeddings"]
