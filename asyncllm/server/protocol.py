"""Request and response bodies of the OpenAI-compatible API (pydantic).

A field this server does not know is refused with a 400 naming it (`extra="forbid"`): a
client asking for beam search, a grammar or tools must not get a 200 without them. OpenAI's
own fields that change nothing in the output (`user`, `metadata`, `store`, ...) are declared
and accepted. Every integer is bounded to int64 where it is parsed, so no value can
overflow a C long later; the engine's SamplingParams then checks the values.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Strict(BaseModel):
    """Every request model: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputsParams(_Strict):
    """vLLM >= 0.12's `structured_outputs` (the guided_* fields' successor; outlines' vLLM client sends it)."""

    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    grammar: str | None = None  # Lark or GBNF (llguidance)
    structural_tag: Any = None  # refused


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions, incl. vLLM's extras."""

    model: str | None = None
    n: Count = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: Count | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: Int64 | None = None
    # OpenAI fields that change nothing in the output: accepted, not used.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM-compatible extras
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Count | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[TokenId] | None = None
    priority: Int64 = 0
    prompt_logprobs: Count | None = None
    # structured outputs: OpenAI's response_format, and vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    logprobs: Count | None = None
    echo: bool = False
    best_of: Count | None = None
    suffix: str | None = None
    # vLLM's beam search extras: n beams (best_of, when given, beams that many), the n best returned.
    use_beam_search: bool = False
    length_penalty: float = 1.0


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: Union[dict[str, Any], str, None] = None  # {"url": "data:image/...;base64,...", "detail": ...}


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call
    reasoning_content: str | None = None  # an assistant's earlier reasoning (not rendered)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Count | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's field; the name is what identifies the adapter here


EmbeddingInput = Union[str, list[str], list[TokenId], list[list[TokenId]]]


class EmbeddingRequest(_Strict):
    """OpenAI's /v1/embeddings, with vLLM's extras."""

    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    user: str | None = None  # accepted, not used
    # vLLM extras (truncate_prompt_tokens -1: to the model's max_model_len)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    normalize: bool | None = None
    priority: Int64 = 0


class ScoreRequest(_Strict):
    """vLLM's /score: text_1 against each of text_2 (or pairwise when both are lists)."""

    model: str | None = None
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    priority: Int64 = 0


class RerankRequest(_Strict):
    """vLLM's (and Jina/Cohere's) /rerank: documents ordered by relevance to the query."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0  # 0: all
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    priority: Int64 = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object of a response or of the final stream chunk."""
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens).model_dump()


def now() -> int:
    return int(time.time())
