"""AsyncLLMEmbeddings: LangChain's `Embeddings` over asyncllm, in process or from a server."""
from __future__ import annotations

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from asyncllm.backends import Backend, make_backend, run_sync


class AsyncLLMEmbeddings(BaseModel, Embeddings):
    """Embeddings from an `asyncllm.AsyncEngine` in this process (e.g. a sentence-transformers
    folder: `AsyncEngine.from_args(model=path)`), or from an asyncllm server's /v1/embeddings.

        embeddings = AsyncLLMEmbeddings(engine=AsyncEngine.from_args(model="all-MiniLM-L6-v2/"))
        vectors = embeddings.embed_documents(["first text", "second text"])
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    engine: object = Field(default=None, exclude=True)
    """An `asyncllm.AsyncEngine` in this process (no HTTP hop)."""
    base_url: str | None = None
    """Or the base URL of an asyncllm server (e.g. http://127.0.0.1:8000)."""
    api_key: SecretStr | None = None
    model: str | None = Field(default=None, alias="model_name")
    """The server's model to embed with (None: its embedding model)."""
    dimensions: int | None = None
    """Matryoshka truncation, for models trained for it."""
    chunk_size: int = 64
    """Texts sent per request."""
    truncate: bool = True
    """Cut texts longer than the model's max_model_len to it, as sentence-transformers does
    (False: such a text is an error)."""

    _backend: Backend | None = PrivateAttr(default=None)

    def _client(self) -> Backend:
        if self._backend is None:
            key = self.api_key.get_secret_value() if self.api_key else None
            self._backend = make_backend(self.engine, self.base_url, key, model=self.model)
        return self._backend

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.chunk_size):
            vectors += await self._client().embed(texts[start:start + self.chunk_size], self.dimensions,
                                                  self.truncate)
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return run_sync(lambda: self.aembed_documents(texts))

    def embed_query(self, text: str) -> list[float]:
        return run_sync(lambda: self.aembed_query(text))
