"""/openapi.json from the pydantic models, behind the auth rules, and schemathesis over it:
no generated request may get a 5xx."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from asyncllm import AsyncEngine
from asyncllm.server import build_app
from asyncllm.server.openapi import openapi_document
from server_helpers import RunningServer

SCHEMA = schemathesis.openapi.from_dict(openapi_document("asyncllm", "test", browser_page=True))


@pytest.fixture(scope="module")
def tiny_server(tiny_models):
    # A tiny random model with a short context: generated requests answer in milliseconds.
    engine = AsyncEngine.from_args(model=tiny_models("LlamaForCausalLM"), dtype="float32", max_model_len=64,
                                   max_tokens_limit=8)
    srv = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    yield srv
    srv.stop()
    engine.shutdown()


def test_openapi_document_is_served_and_guarded(engine):
    from starlette.testclient import TestClient

    with TestClient(build_app(engine, run_lifespan=False, api_key="k")) as client:
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/docs").status_code == 401
        doc = client.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
        assert doc["openapi"].startswith("3.1")
        assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= set(doc["paths"])
        schema = doc["components"]["schemas"]["CompletionRequest"]
        assert "prompt" in schema["required"] and schema["additionalProperties"] is False
        docs = client.get("/docs", headers={"Authorization": "Bearer k"}).text
        assert "/openapi.json" in docs
    public = build_app(engine, run_lifespan=False, api_key="k", public_paths=("/health", "/openapi.json"))
    with TestClient(public) as client:
        assert client.get("/openapi.json").status_code == 200
    with TestClient(build_app(engine, run_lifespan=False, openapi=False)) as client:
        assert client.get("/openapi.json").status_code == 404


@pytest.mark.slow
@pytest.mark.timeout(600)
@SCHEMA.include(method="POST").parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_finds_no_server_error(case, tiny_server):
    response = case.call(base_url=tiny_server.url, timeout=60)
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
