"""LlamaIndex embeddings integration for asyncllm."""
from llama_index.embeddings.asyncllm.base import AsyncLLMEmbedding

__all__ = ["AsyncLLMEmbedding"]
