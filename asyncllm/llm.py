"""LLM: the offline batch API (`llm.generate(prompts)`, `llm.chat(messages)`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from asyncllm.beam_search import BeamSearchOutput, BeamSearchParams, engine_beam_search
from asyncllm.config import EngineArgs
from asyncllm.engine.input_processor import ChatMessages, PromptType
from asyncllm.engine.llm_engine import LLMEngine
from asyncllm.errors import InvalidRequestError
from asyncllm.lora.request import LoRARequest
from asyncllm.outputs import EmbeddingRequestOutput, RequestOutput
from asyncllm.pooling_params import PoolingParams
from asyncllm.sampling_params import RequestOutputKind, SamplingParams
from asyncllm.tools.choice import check_tools
from asyncllm.tools.template import render_chat


class LLM:
    """Generates for a batch of prompts at once (continuous batching inside), returning outputs in order.

    >>> llm = LLM()                                 # the embedded default model
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        if engine_args.get("data_parallel_size", 1) != 1:
            raise ValueError("LLM drives one engine: data_parallel_size > 1 runs its replicas behind "
                             "AsyncEngine.from_args(data_parallel_size=N) or `asyncllm serve MODEL -dp N`")
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_args))
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prompt prefix (as vLLM's LLM.reset_prefix_cache), so the next
        prompts are computed whole. → False (and nothing changes) while requests hold blocks."""
        return self.engine.core.kv.pool.reset_prefix_cache()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """`lora_request`: one adapter for every prompt, or one (or None) per prompt (engine
        started with enable_lora=True)."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _per_prompt(sampling_params or SamplingParams(), len(prompt_list), "sampling params")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"got {len(priority)} priorities for {len(prompt_list)} prompts")
        loras = _per_prompt(lora_request, len(prompt_list), "LoRA requests")
        return self._run(prompt_list, params_list, use_tqdm, priority, loras)

    def chat(self, messages: ChatMessages | Sequence[ChatMessages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """`tools` (OpenAI function tools) are rendered as vLLM's LLM.chat does (by the template, or
        in a Hermes-format system turn for templates without tools); read calls from the outputs with
        `asyncllm.tools.get_tool_parser(name).extract(output.outputs[0].text)`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tools = check_tools(tools) if tools is not None else None
        prompts = [render_chat(self.engine.tokenizer, list(conv), tools, add_generation_prompt, chat_template_kwargs,
                               takes_images=self.engine.takes_images) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def embed(self, prompts: str | list[int] | Sequence[str | list[int]],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """One vector per input (vLLM's LLM.embed): `outputs[i].outputs.embedding`, in input order.
        Inputs are texts or token ids; pooled as the model's pooler config says (a sentence-
        transformers folder's, else last token), normalised unless `PoolingParams(normalize=False)`."""
        prompt_list = _as_prompt_list(prompts)
        params = pooling_params or PoolingParams()
        if truncate_prompt_tokens is not None and isinstance(params, PoolingParams):
            params = dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
        params_list = _per_prompt(params, len(prompt_list), "pooling params")
        return self._run(prompt_list, params_list, use_tqdm, None)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    num_sequences: int | None = None,
                    lora_request: LoRARequest | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: the `num_sequences` (default beam_width) best beams of each
        prompt, best first, scored as transformers' beam search scores them (asyncllm/beam_search.py);
        with `lora_request`, every beam runs with that adapter."""
        engine = self.engine
        prompt_ids = [engine.input_processor.process_prompt(p).prompt_token_ids for p in _as_prompt_list(prompts)]
        batch = engine_beam_search(engine, prompt_ids, params)
        while pending := batch.pending():
            batch.advance(self._run([{"prompt_token_ids": tokens} for tokens in pending],
                                    [batch.step_params] * len(pending), False, None, [lora_request] * len(pending)))
        return batch.outputs(num_sequences)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams | PoolingParams], use_tqdm: bool,
             priority: Sequence[int] | None, loras: Sequence[LoRARequest | None] | None = None) -> list[Any]:
        engine = self.engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = f"llm-{self._counter}"
                self._counter += 1
                final_params = (params if isinstance(params, PoolingParams)
                                else dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY))
                engine.add_request(request_id, prompt, final_params, priority=priority[i] if priority else 0,
                                   lora_request=loras[i] if loras else None)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if isinstance(output.exception, InvalidRequestError):
                        # The caller's error found in the engine (a grammar that does not compile): the
                        # batch stops as it would have at add_request.
                        engine.abort_request([i for i in ids if i not in results])
                        raise output.exception
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[i] for i in ids]


def _per_prompt(params: Any, count: int, what: str) -> list[Any]:
    """One params object for every prompt, or a sequence of them, one per prompt."""
    if isinstance(params, Sequence):
        if len(params) != count:
            raise ValueError(f"got {len(params)} {what} for {count} prompts")
        return list(params)
    return [params] * count


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0]:
        return [list(prompts)]  # one conversation
    return list(prompts)
