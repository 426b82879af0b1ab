"""Fields and backend plumbing shared by the chat model and the completion LLM."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from asyncllm.backends import Backend, GenerationOptions, make_backend


class AsyncLLMFields(BaseModel):
    """Mixed into the LangChain classes: where the model runs and how to sample."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    engine: Any = Field(default=None, exclude=True)
    """An `asyncllm.AsyncEngine` in this process (no HTTP hop)."""
    base_url: str | None = None
    """Or the base URL of an asyncllm server (e.g. http://127.0.0.1:8000)."""
    api_key: SecretStr | None = None
    model: str | None = Field(default=None, alias="model_name")
    """Remote: the served model or LoRA adapter (a name from the server's --lora-modules) to ask
    for; None: the server's first. In process: a label (the adapter comes from `lora_request`)."""
    lora_request: Any = Field(default=None, exclude=True)
    """In process: the `asyncllm.LoRARequest` every call runs with (a call's `lora_request=`
    overrides it)."""
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    timeout: float | None = None
    max_retries: int | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Any other asyncllm SamplingParams field, e.g. {"top_k": 20}."""
    parallel_tool_calls: bool | None = None
    """Whether a reply may call several tools (None: yes, OpenAI's default); `bind_tools` may override."""
    tool_call_parser: str | None = None
    """In process: how free ("auto") replies are read for tool calls (vLLM's names: hermes,
    llama3_json, mistral, pythonic); None: the format the model's chat template teaches. A
    remote server uses its own --tool-call-parser."""

    _backend: Backend | None = PrivateAttr(default=None)

    def backend(self) -> Backend:
        if self._backend is None:
            key = self.api_key.get_secret_value() if self.api_key else None
            self._backend = make_backend(self.engine, self.base_url, key, self.tool_call_parser,
                                         model=self.model if self.engine is None else None)
        return self._backend

    def options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> GenerationOptions:
        kwargs = dict(kwargs)
        schema = kwargs.pop("json_schema", None)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        parallel_tool_calls = kwargs.pop("parallel_tool_calls", self.parallel_tool_calls)
        lora_request = kwargs.pop("lora_request", self.lora_request)
        requested = kwargs.pop("model", None)  # remote: any served model or adapter, per call
        if requested is not None and self.engine is not None and requested != self.resolved_model_name():
            raise ValueError(f"this asyncllm engine serves {self.resolved_model_name()!r}, not {requested!r} "
                             "(in process an adapter is chosen with lora_request)")
        merged_stop = list(stop or []) or self.stop or None
        return GenerationOptions(
            max_tokens=kwargs.pop("max_tokens", self.max_tokens),
            temperature=kwargs.pop("temperature", self.temperature), top_p=kwargs.pop("top_p", self.top_p),
            seed=kwargs.pop("seed", self.seed), stop=merged_stop, json_schema=schema, tools=tools,
            tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, lora_request=lora_request,
            model=requested if self.engine is None else None,
            extra={**self.model_kwargs, **{k: v for k, v in kwargs.items() if v is not None}})

    def resolved_model_name(self) -> str:
        if self.model:
            return self.model
        if self.engine is not None:
            return self.engine.model_name
        return self.backend().model_name
