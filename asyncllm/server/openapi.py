"""The OpenAPI 3.1 document of the API, generated from the pydantic request models.

Served at /openapi.json (and a Swagger UI page at /docs), like FastAPI and vLLM serve
theirs; tests run schemathesis against it.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from asyncllm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
)

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERRORS = {str(status): {"description": text, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for status, text in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                         (413, "body too large"), (429, "overloaded, retry later"), (503, "unavailable")]}


def _post(model: type[BaseModel], summary: str, streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
        "responses": {"200": {"description": "OK", "content": ok}, **_ERRORS},
    }}


def _get(summary: str, media: str = "application/json") -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {media: {"schema": {"type": "object"} if media.endswith("json")
                                                           else {"type": "string"}}}}, **_ERRORS}}}


def openapi_document(title: str, version: str, browser_page: bool) -> dict[str, Any]:
    models = [CompletionRequest, ChatCompletionRequest, EmbeddingRequest, ScoreRequest, RerankRequest, TokenizeRequest,
              DetokenizeRequest]
    _, schema = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    components = dict(schema.get("$defs", {}))
    components["ErrorResponse"] = _ERROR
    paths: dict[str, Any] = {
        "/v1/completions": _post(CompletionRequest, "Create a completion (OpenAI)", streams=True),
        "/v1/chat/completions": _post(ChatCompletionRequest, "Create a chat completion (OpenAI)", streams=True),
        "/v1/embeddings": _post(EmbeddingRequest, "Create embeddings (OpenAI)", streams=False),
        "/score": _post(ScoreRequest, "Cosine similarity of text pairs' embeddings (vLLM)", streams=False),
        "/rerank": _post(RerankRequest, "Documents by similarity to a query (vLLM, Jina, Cohere)", streams=False),
        "/tokenize": _post(TokenizeRequest, "Tokenize a prompt or chat messages", streams=False),
        "/detokenize": _post(DetokenizeRequest, "Token ids to text", streams=False),
        "/v1/models": _get("The served model"),
        "/health": _get("200 while the engine can serve, else 503"),
        "/version": _get("asyncllm's version"),
        "/metrics": _get("Prometheus metrics", "text/plain"),
    }
    if browser_page:
        paths["/"] = _get("The chat page", "text/html")
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": components}}


def swagger_page(openapi_url: str) -> str:
    """Swagger UI over the document (its scripts come from a CDN, as FastAPI's /docs does)."""
    return f"""<!doctype html>
<html><head><title>asyncllm API</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: {openapi_url!r}, dom_id: "#swagger-ui"}});</script>
</body></html>"""
