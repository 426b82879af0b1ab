"""LLMEngine: the synchronous driver both front ends share (offline `LLM`, the engine thread).

add_request: prompt → validated core Requests (one per sample) + output state.
step: EngineCore.step() → OutputProcessor → RequestOutputs; sequences that hit a stop
string are finished in the core in the same step, so their blocks free at once.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from asyncllm.config import EngineArgs, EngineConfig
from asyncllm.engine.engine_core import EngineCore
from asyncllm.engine.input_processor import InputProcessor, PromptType
from asyncllm.engine.output_processor import OutputProcessor, child_request_id
from asyncllm.errors import InvalidRequestError, PromptTooLongError
from asyncllm.lora.registry import LoRARegistry
from asyncllm.lora.request import LoRARequest
from asyncllm.model.tokenizer import apply_chat_template_override
from asyncllm.multimodal.processor import ImagePromptProcessor, parse_limit_mm_per_prompt
from asyncllm.outputs import EmbeddingRequestOutput, RequestOutput
from asyncllm.pooling_params import PoolingParams
from asyncllm.request import Request, RequestStatus
from asyncllm.sampling.grammar_compiler import GrammarCompiler
from asyncllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class PreparedRequest:
    """A validated, tokenized request ready for the engine thread."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    requests: list[Request]


class LLMEngine:
    def __init__(self, config: EngineConfig, core: EngineCore | None = None):
        self.config = config
        self.core = core or EngineCore(config)
        self.tokenizer = self.core.checkpoint.tokenizer
        apply_chat_template_override(self.tokenizer, config.args.chat_template)
        model_cfg = self.core.checkpoint.config
        eos = set(model_cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.input_processor = InputProcessor(self.tokenizer, model_cfg.vocab_size, self.core.max_model_len,
                                              self.eos_token_ids, config.limits, config.args.max_tokens_limit,
                                              config.args.seed,
                                              GrammarCompiler(self.tokenizer, config.structured_limits),
                                              self._image_processor())
        if config.args.structured_outputs_warmup:
            self.input_processor.grammars.warm_up()
        self.output_processor = OutputProcessor(self.tokenizer, self.core.pooler_config.normalize)
        self.loras = LoRARegistry(model_cfg, config.args.enable_lora, config.args.max_lora_rank)

    def _image_processor(self) -> ImagePromptProcessor | None:
        vision = getattr(self.core.checkpoint.config, "vision", None)
        if vision is None:
            return None
        return ImagePromptProcessor(self.core.checkpoint.path, vision.image_token_id, vision.tokens_per_image,
                                    vision.image_size, parse_limit_mm_per_prompt(self.config.args.limit_mm_per_prompt))

    @classmethod
    def from_engine_args(cls, args: EngineArgs | None = None, **overrides) -> "LLMEngine":
        args = args or EngineArgs()
        args.override(overrides)
        return cls(args.create_engine_config())

    @property
    def model_name(self) -> str:
        return self.config.args.served_model_name or self.core.checkpoint.name

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    @property
    def takes_images(self) -> bool:
        return self.input_processor.images is not None

    @property
    def task(self) -> str:
        return self.core.task

    def prepare_request(self, request_id: str, prompt: PromptType,
                        params: SamplingParams | PoolingParams | None = None, priority: int = 0,
                        arrival_time: float | None = None, cache_salt: str | None = None,
                        lora_request: LoRARequest | None = None) -> PreparedRequest:
        """Validates and tokenizes (no engine state touched, safe off the engine thread).
        `lora_request` runs it with that adapter (checked here: a bad one raises at once).

        Raises InvalidRequestError / PromptTooLongError; nothing is queued then.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority must be an integer", param="priority")
        if lora_request is not None:
            if isinstance(params, PoolingParams):
                raise InvalidRequestError("embeddings with a LoRA adapter are not supported", param="lora_request")
            self.loras.check(lora_request)
        if isinstance(params, PoolingParams):
            return self._prepare_pooling(request_id, prompt, params, priority, arrival_time, cache_salt)
        if self.task == "embed":
            raise InvalidRequestError(f"{self.model_name} serves embeddings (task 'embed'): use embed() or "
                                      "/v1/embeddings, not generation", param="model")
        processed = self.input_processor.process_prompt(prompt)
        params.check_limits(self.config.limits, self.core.checkpoint.config.vocab_size)
        samples = params.num_samples
        child_ids = [child_request_id(request_id, i, samples) for i in range(samples)]
        # best_of ranks the samples by cumulative logprob: the core computes each sampled token's.
        core_params = (dataclasses.replace(params, logprobs=0)
                       if params.ranks_samples and params.logprobs is None else params)
        requests = self.input_processor.make_requests(request_id, processed, core_params, child_ids, priority,
                                                      arrival_time, cache_salt, lora_request)
        self.core.check_prompt_fits(len(processed.prompt_token_ids))
        return PreparedRequest(request_id, processed.prompt, processed.prompt_token_ids, params, requests)

    def _prepare_pooling(self, request_id: str, prompt: PromptType, params: PoolingParams, priority: int,
                         arrival_time: float | None, cache_salt: str | None) -> PreparedRequest:
        """An embedding request: one core request that computes its prompt and is pooled."""
        k = params.truncate_prompt_tokens
        if k == -1:
            k = self.max_model_len
        if k is not None and isinstance(prompt, str) and prompt:
            # The tokenizer's own truncation keeps the special tokens an encoder expects ([CLS] ... [SEP]).
            ids = self.tokenizer.encode(prompt, truncation=True, max_length=k)
            processed = self.input_processor.process_prompt({"prompt_token_ids": ids, "prompt": prompt})
        else:
            processed = self.input_processor.process_prompt(prompt)
            if k is not None and len(processed.prompt_token_ids) > k:
                processed.prompt_token_ids = processed.prompt_token_ids[-k:]  # token ids: the last k, as vLLM
        if processed.images:
            raise InvalidRequestError("embeddings of image prompts are not supported", param="input")
        ids = processed.prompt_token_ids
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(f"the input has {len(ids)} tokens but this model takes at most "
                                     f"{self.max_model_len} (max_model_len); pass truncate_prompt_tokens to cut it",
                                     param="input")
        if params.dimensions is not None:
            self._check_dimensions(params.dimensions)
        sampling = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        request = Request(request_id, ids, sampling, frozenset(), 1, priority=priority,
                          arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
                          cache_salt=cache_salt, pooling=True)
        self.core.check_prompt_fits(len(ids))
        return PreparedRequest(request_id, processed.prompt, ids, params, [request])

    def _check_dimensions(self, dimensions: int) -> None:
        """Truncating an embedding only means something for a model trained for it (vLLM's rule)."""
        sizes = self.core.checkpoint.matryoshka_dimensions
        if sizes is None:
            raise InvalidRequestError(f"{self.model_name} was not trained for Matryoshka truncation (no "
                                      "is_matryoshka / matryoshka_dimensions in its config.json): dimensions is "
                                      "not supported", param="dimensions")
        if dimensions > self.hidden_size or (sizes and dimensions not in sizes):
            allowed = ", ".join(map(str, sizes)) if sizes else f"1 to {self.hidden_size}"
            raise InvalidRequestError(f"dimensions must be one of the model's sizes: {allowed}", param="dimensions")

    @property
    def hidden_size(self) -> int:
        return self.core.checkpoint.config.hidden_size

    def submit(self, prepared: PreparedRequest) -> None:
        """Queues a prepared request (engine thread only)."""
        if self.output_processor.has_request(prepared.request_id):
            raise InvalidRequestError(f"request id {prepared.request_id!r} is already in use", param="request_id")
        if isinstance(prepared.params, PoolingParams):
            self.output_processor.add_pooling_request(prepared.request_id, prepared.prompt_token_ids,
                                                      prepared.params, prepared.requests[0].arrival_time)
        else:
            self.output_processor.add_request(prepared.request_id, prepared.prompt, prepared.prompt_token_ids,
                                              prepared.params, prepared.requests[0].arrival_time)
        for request in prepared.requests:
            self.core.add_request(request)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, cache_salt: str | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        self.submit(self.prepare_request(request_id, prompt, params, priority, arrival_time, cache_salt,
                                         lora_request))

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Checks and registers an adapter ahead of its requests (vLLM's add_lora); the workers read
        its weights on first use. → False if that id was registered already."""
        return self.loras.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter id (requests running with it finish with it). → whether it was there."""
        return self.loras.remove(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.loras.list()

    def abort_request(self, request_ids: Iterable[str], reason: str = "abort",
                      error: str | None = None) -> list[RequestOutput]:
        """Ends user requests now (their blocks are freed); returns their final outputs."""
        finals = []
        for request_id in request_ids:
            status = RequestStatus.FINISHED_ERROR if reason == "error" else RequestStatus.FINISHED_ABORTED
            self.core.abort_requests(self.output_processor.child_ids(request_id), status)
            final = self.output_processor.abort(request_id, reason, error)
            if final is not None:
                finals.append(final)
        return finals

    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        processed = self.output_processor.process(self.core.step())
        if processed.stopped_ids:
            self.core.abort_requests(processed.stopped_ids, RequestStatus.FINISHED_STOPPED)
        if processed.failed_ids:
            self.core.abort_requests(processed.failed_ids, RequestStatus.FINISHED_ERROR)
        return processed.outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_unfinished > 0 or self.core.has_unfinished_requests()

    def shutdown(self) -> None:
        self.input_processor.grammars.shutdown()
        self.core.shutdown()
