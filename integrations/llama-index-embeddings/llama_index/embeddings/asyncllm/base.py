"""AsyncLLMEmbedding: a LlamaIndex `BaseEmbedding` over asyncllm, in process or from a server,
with native async methods (the sync ones bridge to them)."""
from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from asyncllm.backends import Backend, make_backend, run_sync


class AsyncLLMEmbedding(BaseEmbedding):
    """Embeddings from an `asyncllm.AsyncEngine` in this process (e.g. a sentence-transformers
    folder), or from an asyncllm server's /v1/embeddings (`base_url`, optionally `model_name`)."""

    base_url: str | None = Field(default=None, description="an asyncllm server, when not in process")
    api_key: str | None = Field(default=None, description="the server's API key")
    dimensions: int | None = Field(default=None, description="Matryoshka truncation, for models trained for it")
    truncate: bool = Field(default=True, description="cut texts past the model's max_model_len to it, as "
                                                     "sentence-transformers does (False: an error)")

    _backend: Backend = PrivateAttr()

    def __init__(self, engine: Any = None, **kwargs: Any):
        base_url = kwargs.get("base_url")
        if engine is not None:
            kwargs.setdefault("model_name", engine.model_name)
        super().__init__(**kwargs)
        requested = kwargs.get("model_name")
        self._backend = make_backend(engine, base_url, self.api_key, model=requested)
        if engine is None and requested is None:
            self.model_name = "asyncllm"

    @classmethod
    def class_name(cls) -> str:
        return "AsyncLLMEmbedding"

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._backend.embed(list(texts), self.dimensions, self.truncate)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aget_text_embeddings([text]))[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await self._aget_text_embedding(query)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return run_sync(lambda: self._aget_text_embeddings(texts))

    def _get_text_embedding(self, text: str) -> list[float]:
        return run_sync(lambda: self._aget_text_embedding(text))

    def _get_query_embedding(self, query: str) -> list[float]:
        return run_sync(lambda: self._aget_query_embedding(query))
