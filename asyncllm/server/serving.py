"""What the completion and chat endpoints share: parsing, model check, params, disconnects, SSE."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.llm_engine import PreparedRequest
from asyncllm.errors import InvalidRequestError
from asyncllm.lora.request import LoRARequest
from asyncllm.outputs import RequestOutput
from asyncllm.sampling.structured import StructuredOutputs
from asyncllm.sampling_params import RequestOutputKind, SamplingParams
from asyncllm.server.errors import APIError, to_api_error
from asyncllm.server.json_body import load_json_body
from asyncllm.server.lora_adapters import ServedAdapters
from asyncllm.server.metrics import ServerMetrics
from asyncllm.server.protocol import _SamplingFields
from asyncllm.server.shutdown import GracefulShutdown
from asyncllm.server.sse import SSEResponse

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass
class ServerContext:
    engine: AsyncEngine
    model_names: list[str]
    metrics: ServerMetrics
    shutdown: GracefulShutdown
    max_prompts_per_request: int = 64
    max_json_depth: int = 64
    auto_tool_parser: str | None = None  # --tool-call-parser, when --enable-auto-tool-choice is on
    reasoning_parser: str | None = None  # --reasoning-parser
    # A second model for /v1/embeddings, /score and /rerank (--embedding-model), and its names.
    embedding_engine: AsyncEngine | None = None
    embedding_names: tuple[str, ...] = ()
    adapters: ServedAdapters | None = None  # LoRA adapters a request's `model` may name

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def all_model_names(self) -> list[str]:
        lora_names = [lora.lora_name for lora in self.adapters.served()] if self.adapters else []
        return self.model_names + [n for n in self.embedding_names if n not in self.model_names] + lora_names

    def check_model(self, model: str | None, generation: bool = True) -> LoRARequest | None:
        """`model` must be served here; for completions and chats, by a model that generates.
        → the adapter when `model` names one (None: the base model)."""
        if generation and self.engine.engine.task == "embed":
            raise InvalidRequestError(f"the model {self.model_name!r} serves embeddings: use /v1/embeddings",
                                      param="model")
        if model is not None and model not in self.model_names:
            lora = self.adapters.get(model) if self.adapters is not None else None
            if lora is not None:
                return lora
            if model in self.embedding_names:
                raise InvalidRequestError(f"the model {model!r} serves embeddings: use /v1/embeddings",
                                          param="model")
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.all_model_names))}", param="model",
                           code="model_not_found")
        return None

    def response_model(self, lora: LoRARequest | None) -> str:
        """The `model` a response reports: the adapter's name, or the served model's."""
        return lora.lora_name if lora is not None else self.model_name

    def embedding_model(self, model: str | None) -> tuple[AsyncEngine, str]:
        """The engine and name that serve an embedding request for `model` (None: the embedding
        model if there is one, else the main model, which pools its hidden states)."""
        if self.embedding_engine is not None and (model is None or model in self.embedding_names):
            return self.embedding_engine, self.embedding_names[0]
        if self.check_model(model, generation=False) is not None:
            raise InvalidRequestError("embeddings with a LoRA adapter are not supported", param="model")
        return self.engine, self.model_name


async def parse_body(request: Request, model: type[M], ctx: ServerContext) -> M:
    data = load_json_body(await request.body(), ctx.max_json_depth)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise to_api_error(exc) from None


def sampling_params(body: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    kind: RequestOutputKind, prompt_logprobs: int | None = None) -> SamplingParams:
    if body.logit_bias is not None:
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None
    else:
        bias = None
    fields: dict[str, Any] = dict(
        n=body.n, max_tokens=max_tokens, stop=body.stop, seed=body.seed, logprobs=logprobs, logit_bias=bias,
        ignore_eos=body.ignore_eos, stop_token_ids=body.stop_token_ids, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, bad_words=body.bad_words,
        allowed_token_ids=body.allowed_token_ids, output_kind=kind,
        prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else body.prompt_logprobs,
    )
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "min_tokens"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    fields["structured_outputs"] = structured_outputs(body)
    fields["best_of"] = getattr(body, "best_of", None)  # completions only
    return SamplingParams(**fields)


def structured_outputs(body: _SamplingFields) -> StructuredOutputs | None:
    specs = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        specs.append(("response_format", StructuredOutputs(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                      param="response_format")
        specs.append(("response_format", StructuredOutputs(json=fmt.json_schema.schema_)))
    if body.guided_json is not None:
        specs.append(("guided_json", StructuredOutputs(json=body.guided_json)))
    if body.guided_regex is not None:
        specs.append(("guided_regex", StructuredOutputs(regex=body.guided_regex)))
    if body.guided_choice is not None:
        specs.append(("guided_choice", StructuredOutputs(choice=body.guided_choice)))
    if body.guided_grammar is not None:
        specs.append(("guided_grammar", StructuredOutputs(grammar=body.guided_grammar)))
    so = body.structured_outputs
    if so is not None:
        if so.structural_tag is not None:
            raise InvalidRequestError("structured_outputs.structural_tag is not supported (json, regex, choice, "
                                      "grammar and json_object are)", param="structured_outputs.structural_tag")
        specs.append(("structured_outputs", StructuredOutputs(json=so.json_, regex=so.regex, choice=so.choice,
                                                              json_object=bool(so.json_object), grammar=so.grammar)))
    if len(specs) > 1:
        raise InvalidRequestError("use only one of response_format, guided_json, guided_regex, guided_choice, "
                                  "guided_grammar, structured_outputs", param=specs[1][0])
    return specs[0][1] if specs else None


def check_context(ctx: ServerContext, prepared: PreparedRequest, max_tokens: int | None) -> None:
    """OpenAI semantics: prompt + max_tokens beyond the context window is the caller's error."""
    room = ctx.engine.max_model_len - len(prepared.prompt_token_ids)
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequestError(
            f"max_tokens={max_tokens} is too large: the prompt has {len(prepared.prompt_token_ids)} tokens and the "
            f"context window is {ctx.engine.max_model_len}; at most {room} tokens can be generated",
            param="max_tokens")


def openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI knows stop and length; an aborted sequence reports as stopped."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def prompt_logprobs_json(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} with the prompt's own token and the top ones."""
    if out.prompt_logprobs is None:
        return None
    return [None if position is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in position.items()} for position in out.prompt_logprobs]


def prompt_list(value: Any, param: str) -> list[Any]:
    """OpenAI's `prompt` / `input`: a string, strings, token ids, or lists of token ids → one prompt each."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(t, int) for t in value):
        return [{"prompt_token_ids": value}]
    if not value:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in value]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def until_disconnected(request: Request, work: Callable[[], Awaitable[T]],
                             streams: list[AsyncIterator[RequestOutput]]) -> T:
    """Runs `work` over `streams`; if the client disconnects first, cancels it and aborts them."""
    result: list[T] = []
    failure: list[BaseException] = []

    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    tg.cancel_scope.cancel()
                    return

        async def run() -> None:
            try:
                result.append(await work())
            except Exception as exc:  # noqa: BLE001 - re-raised below, unwrapped from the task group
                failure.append(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined] # a no-op for the finished ones
    if failure:
        raise failure[0]
    if not result:
        raise APIError(499, "client disconnected", code="client_disconnected")
    return result[0]


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged by index. An error in one is
    raised here; closing this generator closes (and so aborts) every iterator."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await iterators[0].aclose()  # type: ignore[attr-defined]
        return
    send, receive = anyio.create_memory_object_stream[tuple[int, Any]](max_buffer_size=4 * len(iterators))

    async def pump(i: int, it: AsyncIterator[T], out) -> None:
        async with out:
            try:
                async for item in it:
                    await out.send((i, item))
            except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
                await out.send((i, exc))
            finally:
                await it.aclose()  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        async with send:
            for i, it in enumerate(iterators):
                tg.start_soon(pump, i, it, send.clone())
        try:
            async with receive:
                async for i, item in receive:
                    if isinstance(item, Exception):
                        raise item
                    yield i, item
        finally:
            tg.cancel_scope.cancel()


def sse_response(ctx: ServerContext, events: AsyncIterator[dict[str, Any]]) -> SSEResponse:
    """SSE of JSON events then `data: [DONE]` (sse.py), drained by a graceful shutdown."""
    return SSEResponse(events, ctx.shutdown)


def submit_all(engine: AsyncEngine, prepared: list[PreparedRequest]) -> list[AsyncIterator[RequestOutput]]:
    """Queues every request now, before a response starts, so that a full queue is a 429 and not
    an error inside a 200 stream; if one is refused, the ones already queued are aborted."""
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for item in prepared:
            streams.append(engine.submit_prepared(item))
    except BaseException:
        for item in prepared[:len(streams)]:
            engine.abort_now(item.request_id)
        raise
    return streams
