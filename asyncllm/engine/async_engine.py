"""AsyncEngine: the asyncio (and trio, via anyio) face of the engine.

    engine = AsyncEngine.from_args()
    async for text in engine.stream("Tell me a joke", max_tokens=64):
        print(text, end="")

Validation and tokenization happen in the caller's task, so bad requests raise before
anything is queued. The request then goes to the engine thread; outputs come back on a
per-request stream in the caller's event loop. Leaving the `async for` early, cancelling
the task or `aclose()` aborts the request, and its KV blocks are freed on the next step.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio

from asyncllm.beam_search import BeamSearchOutput, BeamSearchParams, engine_beam_search
from asyncllm.config import EngineArgs
from asyncllm.engine.data_parallel import ReplicaSet, load_replicas
from asyncllm.engine.engine_thread import EngineThread
from asyncllm.engine.input_processor import PromptType
from asyncllm.engine.llm_engine import LLMEngine, PreparedRequest
from asyncllm.engine.request_stream import LoopHandle, RequestStream
from asyncllm.engine.stats import EngineSnapshot
from asyncllm.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from asyncllm.lora.request import LoRARequest
from asyncllm.outputs import EmbeddingRequestOutput, RequestOutput
from asyncllm.pooling_params import PoolingParams
from asyncllm.sampling.structured import GrammarError, StructuredOutputs
from asyncllm.sampling_params import RequestOutputKind, SamplingParams
from asyncllm.threads import in_passing_thread

T = TypeVar("T")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, replicas: list[LLMEngine] | None = None):
        """`replicas`: data parallelism's engines (`engine` is the first of them): requests are
        prepared on `engine` (they tokenize alike) and routed to a replica by ReplicaSet."""
        self.engine = engine
        self.engines = replicas or [engine]
        self.tokenizer = engine.tokenizer
        limit = engine.config.args.max_waiting_requests
        self._thread = ReplicaSet(self.engines, limit) if len(self.engines) > 1 else EngineThread(engine, limit)
        self._shut_down = False

    @classmethod
    def from_args(cls, args: EngineArgs | None = None, **overrides: Any) -> "AsyncEngine":
        """Loads the model now (errors surface here); the engine thread starts on first use or start().

        The load runs in a passing thread because torch's CPU kernels run on libgomp: every thread
        that starts a parallel region gets its own pool of OpenMP workers, kept while the thread
        lives, and once the process has more OpenMP threads than CPUs libgomp stops spin-waiting
        between regions and sleeps on a futex. Loading on the app's thread would leave its pool
        behind and push the engine thread over the limit: measured on 2 cores, 75 us instead of
        10 us per parallel region, a 40% slower decode step at batch 8. A thread that exits frees
        its pool."""
        dp = overrides.get("data_parallel_size", args.data_parallel_size if args is not None else 1)
        if dp > 1:  # each replica's model runs in its worker processes; load them side by side
            engines = load_replicas(args or EngineArgs(), overrides)
            return cls(engines[0], engines)
        engine = in_passing_thread(lambda: LLMEngine.from_engine_args(args, **overrides), name="asyncllm-load")
        return cls(engine)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._shut_down:
            raise RuntimeError("this engine was shut down; create a new one")
        self._thread.start()

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stops accepting requests, lets in-flight ones finish for `timeout` s, aborts the rest.

        Every open iterator ends (aborted ones with finish_reason "abort"). A second call is a no-op.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self._thread.shutdown(timeout)
        for engine in self.engines:
            engine.shutdown()

    async def ashutdown(self, timeout: float | None = 5.0) -> None:
        """shutdown() without blocking the event loop."""
        await anyio.to_thread.run_sync(self.shutdown, timeout)

    async def __aenter__(self) -> "AsyncEngine":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ashutdown()

    @property
    def is_healthy(self) -> bool:
        """It can serve (with data parallelism: at least one replica can)."""
        return not self._shut_down and self._thread.serving

    @property
    def replicas_serving(self) -> list[bool]:
        """Per data-parallel replica (one entry without data parallelism): can it serve?"""
        return self._thread.alive if isinstance(self._thread, ReplicaSet) else [self._thread.serving]

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._thread.dead_error

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineSnapshot:
        return self._thread.stats.snapshot

    @property
    def stats_collector(self):
        return self._thread.stats

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs as the request progresses (shape per sampling_params.output_kind)."""
        prepared = self.prepare(prompt, sampling_params, request_id, priority, cache_salt, lora_request)
        async for output in self.generate_prepared(prepared):
            yield output

    def prepare(self, prompt: PromptType, sampling_params: SamplingParams | PoolingParams | None = None,
                request_id: str | None = None, priority: int = 0, cache_salt: str | None = None,
                lora_request: LoRARequest | None = None) -> PreparedRequest:
        """Validates and tokenizes now (raises InvalidRequestError); run it with generate_prepared()."""
        return self.engine.prepare_request(request_id or uuid.uuid4().hex, prompt, sampling_params, priority,
                                           cache_salt=cache_salt, lora_request=lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Checks and registers an adapter ahead of its requests (vLLM's add_lora). → False if that
        id was registered already."""
        return [engine.add_lora(lora_request) for engine in self.engines][0]

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter id: new requests naming it are refused, running ones finish with it."""
        return [engine.remove_lora(lora_int_id) for engine in self.engines][0]

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    async def generate_prepared(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Queues the request when first iterated and yields its outputs."""
        outputs = self.submit_prepared(prepared)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def submit_prepared(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Queues the request now (EngineOverloadedError, EngineShutdownError, EngineDeadError
        are raised here, so a server can answer 429/503 before a response starts) and returns
        the iterator of its outputs; closing that iterator early aborts the request. Call it
        inside the event loop that will read the outputs."""
        stream = RequestStream(prepared.request_id, LoopHandle.current())
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if not self._shut_down:
            self._thread.start()  # lazy start
        self._thread.submit(prepared, stream)
        return RequestOutputs(stream, self._thread.abort)

    def abort_now(self, request_id: str) -> None:
        """abort() for synchronous code: the engine thread frees the request's blocks on its next turn."""
        self._thread.abort(request_id)

    async def stream(self, prompt_or_messages: PromptType, sampling_params: SamplingParams | None = None,
                     *, request_id: str | None = None, priority: int = 0, lora_request: LoRARequest | None = None,
                     **params: Any) -> AsyncIterator[str]:
        """Yields text deltas. Chat messages (list of {role, content}) go through the chat template.

        `params` are SamplingParams fields, e.g. `stream(prompt, max_tokens=64, temperature=0)`;
        `lora_request` runs it with that adapter.
        """
        params = _merge_params(sampling_params, params, RequestOutputKind.DELTA)
        if params.n != 1:
            raise InvalidRequestError("stream() yields one text; use generate() for n > 1", param="n")
        gen = self.generate(prompt_or_messages, params, request_id=request_id, priority=priority,
                            lora_request=lora_request)
        try:
            async for output in gen:
                text = output.outputs[0].text if output.outputs else ""
                if text:
                    yield text
        finally:
            await gen.aclose()

    async def complete(self, prompt_or_messages: PromptType, sampling_params: SamplingParams | None = None,
                       *, request_id: str | None = None, priority: int = 0, lora_request: LoRARequest | None = None,
                       **params: Any) -> RequestOutput:
        """The finished RequestOutput of one request."""
        params = _merge_params(sampling_params, params, RequestOutputKind.FINAL_ONLY)
        gen = self.generate(prompt_or_messages, params, request_id=request_id, priority=priority,
                            lora_request=lora_request)
        try:
            async for output in gen:
                if output.finished:
                    return output
        finally:
            await gen.aclose()
        raise RuntimeError("the request ended without a final output")

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams | None = None, *,
                     request_id: str | None = None, priority: int = 0) -> EmbeddingRequestOutput:
        """One input's embedding output (vLLM's shape: `.outputs.embedding`)."""
        prepared = self.prepare(prompt, pooling_params or PoolingParams(), request_id, priority)
        return (await self._embed_prepared([prepared]))[0]

    async def embed(self, inputs: str | list[int] | list[str] | list[list[int]], *, dimensions: int | None = None,
                    normalize: bool | None = None, truncate_prompt_tokens: int | None = None,
                    priority: int = 0) -> list[float] | list[list[float]]:
        """Embeddings of a text (or token ids) → one vector, of a list of them → a vector each, in
        order; all are batched together in the engine. Every input is validated before any is queued."""
        single = isinstance(inputs, str) or (isinstance(inputs, list) and bool(inputs)
                                             and all(isinstance(t, int) for t in inputs))
        items = [inputs] if single else list(inputs)
        if not items:
            raise InvalidRequestError("nothing to embed: pass a text or a non-empty list", param="input")
        params = PoolingParams(dimensions, normalize, truncate_prompt_tokens)
        prepared = [self.prepare(item, params, None, priority) for item in items]
        vectors = [out.outputs.embedding for out in await self._embed_prepared(prepared)]
        return vectors[0] if single else vectors

    async def _embed_prepared(self, prepared: list[PreparedRequest]) -> list[EmbeddingRequestOutput]:
        finals = await self._finals(prepared)
        for final in finals:
            if final.outputs is None:
                raise RequestFailedError(f"embedding request {final.request_id} was aborted")
        return finals

    async def _finals(self, prepared: list[PreparedRequest]) -> list[Any]:
        """Queues every request, then awaits each one's final output (all closed on the way out)."""
        streams = [self.submit_prepared(p) for p in prepared]
        finals = []
        try:
            for item, stream in zip(prepared, streams):
                final = None
                async for output in stream:
                    final = output
                if final is None:
                    raise RequestFailedError(f"request {item.request_id} ended without a final output")
                finals.append(final)
        finally:
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
        return finals

    async def beam_search(self, prompt: PromptType, params: BeamSearchParams, *, num_sequences: int | None = None,
                          priority: int = 0, lora_request: LoRARequest | None = None) -> BeamSearchOutput:
        """One prompt's best beams (as LLM.beam_search); each step's beams run as one batch of
        one-token requests, sharing their prefixes through the prefix cache."""
        prompt_ids = self.engine.input_processor.process_prompt(prompt).prompt_token_ids
        batch = engine_beam_search(self.engine, [prompt_ids], params)
        while pending := batch.pending():
            prepared = [self.prepare({"prompt_token_ids": tokens}, batch.step_params, None, priority,
                                     lora_request=lora_request) for tokens in pending]
            finals = await self._finals(prepared)
            if any(not final.outputs or not final.outputs[0].logprobs for final in finals):
                raise RequestFailedError("a beam's step did not finish")
            batch.advance(finals)
        return batch.outputs(num_sequences)[0]

    async def abort(self, request_id: str) -> None:
        self._thread.abort(request_id)

    async def wait_for_grammar(self, prepared: PreparedRequest) -> None:
        """Awaits the structured-output compilation of a prepared request (raises GrammarError),
        without blocking the event loop; lets a server answer 400 before it starts streaming."""
        grammar = prepared.requests[0].grammar
        if grammar is None:
            return
        limit = max(0.0, grammar.deadline - time.monotonic())
        try:
            await anyio.to_thread.run_sync(grammar.future.result, limit)
        except concurrent.futures.TimeoutError:
            raise GrammarError("compiling the structure took longer than the limit") from None

    async def complete_json(self, prompt_or_messages: PromptType, model: type[T], **params: Any) -> T:
        """Generates JSON constrained to `model`'s schema and returns the parsed pydantic model."""
        out = await self.complete(prompt_or_messages, json_schema=model, **params)
        return parse_json_output(out, model)


class RequestOutputs:
    """The outputs of one queued request. Unlike an async generator, aclose() aborts the
    request even when iteration never began (a client gone before its first token)."""

    def __init__(self, stream: RequestStream, abort: Callable[[str], None]):
        self._stream = stream
        self._abort = abort
        self._done = False

    def __aiter__(self) -> "RequestOutputs":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._stream.get()
        except BaseException:
            await self.aclose()  # an error, or the reader was cancelled
            raise
        if output.finished:
            self._done = True
        return output

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            if not self._stream.finished:
                self._abort(self._stream.request_id)


def parse_json_output(output: RequestOutput, model: type[T]) -> T:
    """The first completion of `output` parsed as `model` (a pydantic class)."""
    completion = output.outputs[0]
    if completion.finish_reason == "length":
        raise ValueError("the JSON was cut by max_tokens before it was complete; raise max_tokens")
    return model.model_validate_json(completion.text)


_STRUCTURED_SHORTCUTS = {"json_schema": "json", "json_object": "json_object", "regex": "regex", "choice": "choice",
                         "grammar": "grammar"}


def _merge_params(base: SamplingParams | None, overrides: dict[str, Any], kind: RequestOutputKind) -> SamplingParams:
    if base is not None and overrides:
        raise TypeError("pass either sampling_params or keyword sampling parameters, not both")
    structured = {_STRUCTURED_SHORTCUTS[k]: overrides.pop(k) for k in list(overrides) if k in _STRUCTURED_SHORTCUTS}
    if structured:
        overrides["structured_outputs"] = StructuredOutputs(**structured)
    if base is None:
        try:
            base = SamplingParams(**overrides)
        except TypeError as exc:
            raise InvalidRequestError(f"unknown sampling parameter: {exc}") from None
    return dataclasses.replace(base, output_kind=kind)
