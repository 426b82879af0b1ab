"""outlines' model interfaces over asyncllm.

Output types become asyncllm structured outputs, decoded in the engine (outlines-core's
automata, as outlines' own vLLM models do): JSON schemas (pydantic models, dataclasses,
TypedDicts, `outlines.types.JsonSchema`) as `json`, every other term (regex, `Literal`/choices,
`int`, ...) as its regex; a JSON schema with a custom whitespace pattern goes as its regex too.
Context-free grammars (`outlines.types.CFG`, Lark) go as asyncllm grammars (llguidance).
Inputs are a string (chat-templated when the model has a template, as outlines' vLLM offline
model does) or an `outlines.inputs.Chat`; keyword arguments are `asyncllm.SamplingParams`
fields, or `sampling_params=SamplingParams(...)`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import singledispatchmethod
from typing import Any

from outlines.inputs import Chat
from outlines.models.base import ModelTypeAdapter
from outlines.models.vllm import AsyncVLLM
from outlines.models.vllm_offline import VLLMOffline
from outlines.types.dsl import CFG, JsonSchema, python_types_to_terms, to_regex

from asyncllm import LLM, AsyncEngine, SamplingParams
from asyncllm.sampling.structured import StructuredOutputs
from asyncllm.sampling_params import RequestOutputKind
from asyncllm.tools.template import render_chat


class AsyncLLMTypeAdapter(ModelTypeAdapter):
    def __init__(self, has_chat_template: bool):
        self.has_chat_template = has_chat_template

    @singledispatchmethod
    def format_input(self, model_input: Any) -> Any:
        raise TypeError(f"asyncllm models take a str or an outlines Chat, not {type(model_input).__name__}")

    @format_input.register(str)
    def _format_str(self, model_input: str) -> str | list[dict[str, str]]:
        return [{"role": "user", "content": model_input}] if self.has_chat_template else model_input

    @format_input.register(Chat)
    def _format_chat(self, model_input: Chat) -> list[dict[str, str]]:
        messages = []
        for message in model_input.messages:
            if not isinstance(message.get("content"), str):
                raise ValueError("asyncllm models take text messages only (no images or other assets)")
            messages.append({"role": message["role"], "content": message["content"]})
        return messages

    def format_output_type(self, output_type: Any = None) -> StructuredOutputs | None:
        if output_type is None:
            return None
        term = python_types_to_terms(output_type)
        if isinstance(term, CFG):
            return StructuredOutputs(grammar=term.definition)
        if isinstance(term, JsonSchema) and not term.whitespace_pattern:
            return StructuredOutputs(json=json.loads(term.schema))
        return StructuredOutputs(regex=to_regex(term))


def _sampling_params(type_adapter: AsyncLLMTypeAdapter, output_type: Any, kwargs: dict[str, Any],
                     kind: RequestOutputKind) -> SamplingParams:
    params = kwargs.pop("sampling_params", None)
    if params is None:
        params = SamplingParams(**kwargs)
    elif kwargs:
        raise ValueError(f"pass sampling_params or SamplingParams fields, not both (got {sorted(kwargs)})")
    structured = type_adapter.format_output_type(output_type)
    if structured is not None:
        params = dataclasses.replace(params, structured_outputs=structured)
    return dataclasses.replace(params, output_kind=kind)


def _prompt(type_adapter: AsyncLLMTypeAdapter, tokenizer: Any, model_input: Any) -> Any:
    """A text prompt as it is, a chat rendered by the model's template (as the server renders it)."""
    formatted = type_adapter.format_input(model_input)
    return formatted if isinstance(formatted, str) else render_chat(tokenizer, formatted, None)


def _texts(output) -> str | list[str]:
    texts = [c.text for c in sorted(output.outputs, key=lambda c: c.index)]
    return texts[0] if len(texts) == 1 else texts


# outlines.Generator accepts only the model classes it lists (isinstance on a closed Union), so the
# two models below subclass outlines' vLLM models, whose places they take; they override every
# method and use nothing of their parents but outlines' base-model plumbing (__call__, batch, stream).
class LLMOutlines(VLLMOffline):
    """outlines' sync model over `asyncllm.LLM` (what `from_vllm_offline` is for vLLM), streaming too."""

    tensor_library_name = "torch"

    def __init__(self, llm: LLM):
        self.model = llm
        self.type_adapter = AsyncLLMTypeAdapter(llm.get_tokenizer().chat_template is not None)

    def _prompt(self, model_input: Any) -> Any:
        return _prompt(self.type_adapter, self.model.get_tokenizer(), model_input)

    def generate(self, model_input: Any, output_type: Any = None, **inference_kwargs: Any) -> str | list[str]:
        params = _sampling_params(self.type_adapter, output_type, inference_kwargs, RequestOutputKind.FINAL_ONLY)
        (output,) = self.model.generate([self._prompt(model_input)], params, use_tqdm=False)
        return _texts(output)

    def generate_batch(self, model_input: list[Any], output_type: Any = None,
                       **inference_kwargs: Any) -> list[str] | list[list[str]]:
        params = _sampling_params(self.type_adapter, output_type, inference_kwargs, RequestOutputKind.FINAL_ONLY)
        outputs = self.model.generate([self._prompt(item) for item in model_input], params, use_tqdm=False)
        return [_texts(output) for output in outputs]

    def generate_stream(self, model_input: Any, output_type: Any = None, **inference_kwargs: Any) -> Iterator[str]:
        """Text deltas as the engine steps; leaving the iterator early aborts the request."""
        params = _sampling_params(self.type_adapter, output_type, inference_kwargs, RequestOutputKind.DELTA)
        if params.n != 1:
            raise ValueError("streaming yields one text; use generate() for n > 1")
        engine = self.model.engine
        request_id = f"outlines-{uuid.uuid4().hex}"
        engine.add_request(request_id, self._prompt(model_input), params)
        finished = False
        try:
            while not finished:
                for output in engine.step():
                    if output.request_id != request_id:
                        continue
                    if output.outputs and output.outputs[0].text:
                        yield output.outputs[0].text
                    finished = output.finished
        finally:
            if not finished:
                engine.abort_request([request_id])


class AsyncLLMOutlines(AsyncVLLM):
    """outlines' async model over `asyncllm.AsyncEngine`: concurrent calls batch in the engine."""

    tensor_library_name = "torch"

    def __init__(self, engine: AsyncEngine):
        self.model = engine
        self.type_adapter = AsyncLLMTypeAdapter(engine.tokenizer.chat_template is not None)

    def _prompt(self, model_input: Any) -> Any:
        return _prompt(self.type_adapter, self.model.tokenizer, model_input)

    async def generate(self, model_input: Any, output_type: Any = None, **inference_kwargs: Any) -> str | list[str]:
        params = _sampling_params(self.type_adapter, output_type, inference_kwargs, RequestOutputKind.FINAL_ONLY)
        return _texts(await self.model.complete(self._prompt(model_input), params))

    async def generate_batch(self, model_input: list[Any], output_type: Any = None,
                             **inference_kwargs: Any) -> list[str] | list[list[str]]:
        params = _sampling_params(self.type_adapter, output_type, inference_kwargs, RequestOutputKind.FINAL_ONLY)
        outputs = await asyncio.gather(*(self.model.complete(self._prompt(item), params) for item in model_input))
        return [_texts(output) for output in outputs]

    async def generate_stream(self, model_input: Any, output_type: Any = None,
                              **inference_kwargs: Any) -> AsyncIterator[str]:
        params = _sampling_params(self.type_adapter, output_type, inference_kwargs, RequestOutputKind.DELTA)
        stream = self.model.stream(self._prompt(model_input), params)
        try:
            async for text in stream:
                yield text
        finally:
            await stream.aclose()  # leaving early aborts the request


def from_asyncllm(model: LLM | AsyncEngine) -> LLMOutlines | AsyncLLMOutlines:
    """An outlines model: sync over `asyncllm.LLM`, async over `asyncllm.AsyncEngine`."""
    if isinstance(model, LLM):
        return LLMOutlines(model)
    if isinstance(model, AsyncEngine):
        return AsyncLLMOutlines(model)
    raise TypeError(f"from_asyncllm takes an asyncllm.LLM or an asyncllm.AsyncEngine, not {type(model).__name__}")
