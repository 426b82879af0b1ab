"""InputProcessor: a caller's prompt and SamplingParams → validated token ids and core Requests.

Everything that can be wrong with a request is found here, before it is queued, so
errors reach the caller at once (and the server answers 400 with the offending param).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Union

from transformers import PreTrainedTokenizerBase

from asyncllm.errors import InvalidRequestError, PromptTooLongError
from asyncllm.lora.request import LoRARequest
from asyncllm.multimodal.inputs import ImageInput
from asyncllm.multimodal.processor import ImagePromptProcessor, image_sources
from asyncllm.request import Request
from asyncllm.sampling.grammar_compiler import GrammarCompiler
from asyncllm.sampling.structured import GrammarState
from asyncllm.sampling_params import SamplingLimits, SamplingParams

ChatMessages = list[dict[str, Any]]
PromptType = Union[str, list[int], ChatMessages, dict[str, Any]]


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)  # placeholders expanded in prompt_token_ids


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: ChatMessages,
                        add_generation_prompt: bool = True, **kwargs: Any) -> str:
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequestError("each message needs a role and content", param="messages")
    if tokenizer.chat_template is None:
        raise InvalidRequestError("this model's tokenizer has no chat template; pass --chat-template", "messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja errors: the template rejected these messages
        raise InvalidRequestError(f"chat template failed on these messages: {exc}", param="messages") from None


class InputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], limits: SamplingLimits, max_tokens_limit: int | None, seed: int,
                 grammars: GrammarCompiler | None = None, images: ImagePromptProcessor | None = None):
        self.tokenizer = tokenizer
        self.images = images  # None: the model takes no images
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.limits = limits
        self.max_tokens_limit = max_tokens_limit
        self.seed = seed
        self.grammars = grammars

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        """A prompt → its token ids; images (chat image parts, or a dict prompt's vLLM-style
        `multi_modal_data`) are loaded and their placeholders expanded."""
        images: list[Any] = []
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            from asyncllm.tools.template import render_chat

            prompt = render_chat(self.tokenizer, prompt, None, takes_images=self.images is not None)
        if isinstance(prompt, dict):
            images = image_sources(prompt.get("multi_modal_data"))
            if "prompt_token_ids" in prompt:
                processed = self._token_prompt(list(prompt["prompt_token_ids"]), prompt.get("prompt"))
            elif "messages" in prompt:
                if images:
                    raise InvalidRequestError("put a chat's images in its messages' image parts, not in "
                                              "multi_modal_data", param="multi_modal_data")
                return self.process_prompt(list(prompt["messages"]))
            elif "prompt" in prompt and isinstance(prompt["prompt"], str):
                processed = self._text_prompt(prompt["prompt"])
            elif "prompt" in prompt and not images:
                return self.process_prompt(prompt["prompt"])
            else:
                raise InvalidRequestError("a dict prompt needs 'prompt' (text with images), 'prompt_token_ids' or "
                                          "'messages'", "prompt")
        elif isinstance(prompt, str):
            processed = self._text_prompt(prompt)
        elif isinstance(prompt, list):
            processed = self._token_prompt(prompt, None)
        else:
            raise InvalidRequestError(f"unsupported prompt type {type(prompt).__name__}: pass a string, "
                                      "token ids or chat messages", param="prompt")
        if self.images is None:
            if images:
                raise InvalidRequestError("this model does not take image input (a LLaVA-style model does)",
                                          param="messages")
            return processed
        processed.prompt_token_ids, processed.images = self.images.process(processed.prompt_token_ids, images)
        return processed

    def _text_prompt(self, prompt: str) -> ProcessedPrompt:
        if not prompt:
            raise InvalidRequestError("the prompt must not be empty", param="prompt")
        return ProcessedPrompt(prompt, self.tokenizer.encode(prompt))

    def _token_prompt(self, ids: list[Any], text: str | None) -> ProcessedPrompt:
        if not ids:
            raise InvalidRequestError("the prompt must not be empty", param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        return ProcessedPrompt(text, list(ids))

    def make_requests(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams, child_ids: list[str],
                      priority: int = 0, arrival_time: float | None = None,
                      cache_salt: str | None = None, lora_request: LoRARequest | None = None) -> list[Request]:
        n_prompt = len(prompt.prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens but this engine's max_model_len is {self.max_model_len} "
                "(prompt + at least one output token must fit)", param="prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if self.max_tokens_limit is not None and max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens must be <= {self.max_tokens_limit}, got {max_tokens}", "max_tokens")
        max_tokens = min(max_tokens, self.max_model_len - n_prompt)
        if params.bad_words and not params._bad_words_token_ids:
            params._bad_words_token_ids = self._bad_words_ids(params.bad_words)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        compilation = None
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise InvalidRequestError("structured outputs are not available", param="structured_outputs")
            compilation = self.grammars.submit(params.structured_outputs)  # validates now, compiles in a worker
        requests = []
        for index, child_id in enumerate(child_ids):
            # Sample i of a seeded request gets its own stream, so the n samples differ.
            seed = None if params.seed is None else (params.seed + index * 1_000_003) % 2**64
            grammar = None
            if compilation is not None:
                grammar = GrammarState(compilation.future, self.grammars.eos_token_id, compilation.deadline)
            requests.append(Request(child_id, prompt.prompt_token_ids, params, self.eos_token_ids, max_tokens,
                                    priority=priority, arrival_time=arrival, cache_salt=cache_salt,
                                    sample_seed=seed, grammar=grammar, lora_request=lora_request,
                                    images=prompt.images))
        return requests

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        out = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out
