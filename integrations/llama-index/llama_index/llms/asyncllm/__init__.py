"""LlamaIndex integration for asyncllm."""
from llama_index.llms.asyncllm.base import AsyncLLM

__all__ = ["AsyncLLM"]
