"""outlines models on asyncllm, in process (outlines' `from_vllm_offline` needs vllm).

>>> model = from_asyncllm(asyncllm.LLM())              # sync: outlines.Generator(model, Pet)(prompt)
>>> model = from_asyncllm(asyncllm.AsyncEngine.from_args())   # async: await generator(prompt)
"""
from outlines_asyncllm.models import AsyncLLMOutlines, AsyncLLMTypeAdapter, LLMOutlines, from_asyncllm

__all__ = ["AsyncLLMOutlines", "AsyncLLMTypeAdapter", "LLMOutlines", "from_asyncllm"]
