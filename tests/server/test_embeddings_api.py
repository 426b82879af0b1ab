"""/v1/embeddings, /score and /rerank with the real openai client on a real uvicorn: a chat model
and an embedding model served by one process and picked by `model`; the embedding model's
vectors equal sentence-transformers'; bad input is a 400 naming the field."""
import base64
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from server_helpers import RunningServer, stop_process

from asyncllm import AsyncEngine
from asyncllm.server import build_app

MINILM = "all-MiniLM-L6-v2"
TEXTS = ["How do I reset my password?", "The cat sat on the mat.", "Paris is the capital of France.",
         "Reset your password from the account settings page."]


@pytest.fixture(scope="module")
def embedding_engine(minilm_path):
    engine = AsyncEngine.from_args(model=minilm_path, dtype="float32")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def two_model_server(engine, embedding_engine):
    srv = RunningServer(build_app(engine, embedding_engine=embedding_engine, embedding_model_name=MINILM,
                                  run_lifespan=False), lifespan="off")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(two_model_server):
    return openai.OpenAI(base_url=two_model_server.url + "/v1", api_key="x")


@pytest.fixture(scope="module")
def reference(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu").encode(TEXTS)


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_openai_client_embeddings_equal_sentence_transformers(client, reference):
    # The client asks for base64 by default and decodes it; float is asked for explicitly.
    for fmt in (openai.NOT_GIVEN, "float"):
        r = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format=fmt)
        got = np.array([d.embedding for d in r.data])
        assert [d.index for d in r.data] == [0, 1, 2, 3] and got.shape == (4, 384)
        assert _cos(got, reference).min() >= 0.9999
        assert r.model == MINILM and r.usage.prompt_tokens == r.usage.total_tokens > 4 * 3
    one = client.embeddings.create(model=MINILM, input=TEXTS[2], encoding_format="float")
    assert _cos(one.data[0].embedding, reference[2]) >= 0.9999


def test_token_id_inputs_and_base64_bytes(client, two_model_server, embedding_engine, reference):
    ids = [embedding_engine.tokenizer.encode(t) for t in TEXTS[:2]]
    r = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    assert _cos([d.embedding for d in r.data], reference[:2]).min() >= 0.9999
    r = client.embeddings.create(model=MINILM, input=ids[0], encoding_format="float")
    assert _cos(r.data[0].embedding, reference[0]) >= 0.9999
    raw = httpx.post(two_model_server.url + "/v1/embeddings",
                     json={"input": TEXTS[1], "encoding_format": "base64"}).json()  # no model: the embedding one
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert raw["model"] == MINILM and _cos(vector, reference[1]) >= 0.9999


def test_models_lists_both_and_requests_route_by_model(client, engine):
    models = {m.id: m for m in client.models.list().data}
    assert {engine.model_name, MINILM} <= set(models)  # (and the folder's own name, an alias)
    assert models[MINILM].model_extra["task"] == "embed"
    assert models[engine.model_name].model_extra["task"] == "generate"
    chat = client.chat.completions.create(model=engine.model_name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.content
    # The chat model embeds too (its last token's hidden state), when named.
    r = client.embeddings.create(model=engine.model_name, input="Hello", encoding_format="float")
    assert len(r.data[0].embedding) == 576 and abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5
    with pytest.raises(openai.BadRequestError, match="serves embeddings"):
        client.completions.create(model=MINILM, prompt="Hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="Hello")


def test_score_and_rerank_by_cosine(two_model_server, reference):
    url = two_model_server.url
    score = httpx.post(url + "/score", json={"model": MINILM, "text_1": TEXTS[0], "text_2": TEXTS[1:]}).json()
    expected = _cos(np.repeat(reference[:1], 3, axis=0), reference[1:])
    assert np.allclose([d["score"] for d in score["data"]], expected, atol=1e-4)
    rerank = httpx.post(url + "/v1/rerank", json={"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 2}).json()
    assert [r["index"] for r in rerank["results"]] == list(np.argsort(-expected)[:2])
    assert rerank["results"][0]["document"]["text"] == TEXTS[3]  # the password answer ranks first


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"),
    ({"input": "x", "dimensions": 64}, "dimensions"),  # MiniLM was not trained for Matryoshka truncation
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": [[2**40]]}, "input"),
    ({"input": [[10**6]]}, "prompt"),  # past the vocabulary
    ({"input": "word " * 400}, "input"),  # past max_model_len (256) without truncate_prompt_tokens
    ({"input": "x", "extra": 1}, "extra"),
])
def test_bad_embedding_requests_get_400_naming_the_field(two_model_server, body, param):
    r = httpx.post(two_model_server.url + "/v1/embeddings", json={"model": MINILM, **body})
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or ""), r.json()


def test_truncate_prompt_tokens_as_vllm_takes_it(client):
    r = client.embeddings.create(model=MINILM, input="word " * 400, encoding_format="float",
                                 extra_body={"truncate_prompt_tokens": 256})
    assert r.usage.prompt_tokens == 256


@pytest.mark.timeout(120)
def test_cli_serves_an_embedding_folder(minilm_path):
    """`asyncllm serve <sentence-transformers folder>`: the task comes from the architecture."""
    proc = subprocess.Popen([sys.executable, "-m", "asyncllm.cli", "serve", minilm_path, "--port", "0",
                             "--dtype", "float32", "--no-kv-cache-prefault"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, lines, deadline = None, [], time.monotonic() + 90
        while time.monotonic() < deadline and url is None:
            lines.append(proc.stdout.readline())
            match = re.search(r"serving (http://127\.0\.0\.1:\d+)", lines[-1])
            url = match.group(1) if match else None
            assert proc.poll() is None, "".join(lines)
        assert url, "".join(lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        name = client.models.list().data[0].id
        assert len(client.embeddings.create(model=name, input="hi").data[0].embedding) == 384
        with pytest.raises(openai.BadRequestError, match="serves embeddings"):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    finally:
        stop_process(proc)
