"""What framework adapters (LangChain, LlamaIndex) talk to: one streaming interface, two backends.

- `LocalBackend(engine)`: in-process, straight into an AsyncEngine (no HTTP hop).
- `RemoteBackend(base_url)`: an asyncllm (or any OpenAI-compatible) server over httpx + SSE.

Both also `embed` texts (the embeddings adapters use that).

Both yield `Delta`s (text and tool-call fragments in OpenAI's stream shape, then a last one
with finish reason and usage); chat messages may carry `tools` and `tool_choice` (read by
asyncllm's tool parsers in process, by the server remotely). Closing the
iterator early aborts the request (locally: the engine frees its KV blocks; remotely: the
connection closes and the server aborts it). `iterate_sync` / `run_sync` let sync
framework methods use the async backends from any thread.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from asyncllm.errors import InvalidRequestError
from asyncllm.threads import in_passing_thread

T = TypeVar("T")


@dataclass
class Delta:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI delta.tool_calls: {index, id?, type?, function}


@dataclass
class GenerationOptions:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    json_schema: dict | None = None  # constrain the output to this JSON schema
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools (chat only)
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None
    lora_request: Any = None  # in process: an asyncllm.LoRARequest (a server picks adapters by `model`)
    model: str | None = None  # remote: the served model or LoRA adapter to ask for (None: the backend's)
    extra: dict[str, Any] = field(default_factory=dict)  # any other SamplingParams / request fields

    def sampling_kwargs(self) -> dict[str, Any]:
        out = {k: v for k, v in (("max_tokens", self.max_tokens), ("temperature", self.temperature),
                                 ("top_p", self.top_p), ("seed", self.seed), ("stop", self.stop)) if v is not None}
        return {**out, **self.extra}


class Backend(Protocol):
    model_name: str
    context_window: int

    def stream(self, prompt: str | list[dict[str, Any]], options: GenerationOptions) -> AsyncIterator[Delta]:
        """`prompt`: text (completion) or chat messages."""
        ...

    async def embed(self, texts: list[str], dimensions: int | None = None,
                    truncate: bool = False) -> list[list[float]]:
        """One vector per text (an embedding model, or the model's pooled hidden states);
        `truncate` cuts texts past the model's max_model_len (else they are an error)."""
        ...


class LocalBackend:
    """`tool_call_parser` reads free ("auto") replies to requests with tools; None: the one the
    model's chat template teaches (`asyncllm.tools.template.guess_tool_parser`)."""

    def __init__(self, engine, tool_call_parser: str | None = None):
        self.engine = engine
        self.tool_call_parser = tool_call_parser

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def context_window(self) -> int:
        return self.engine.max_model_len

    async def embed(self, texts: list[str], dimensions: int | None = None,
                    truncate: bool = False) -> list[list[float]]:
        """One vector per text, batched together in the engine."""
        if not texts:
            return []
        return await self.engine.embed(list(texts), dimensions=dimensions,
                                       truncate_prompt_tokens=-1 if truncate else None)

    async def stream(self, prompt: str | list[dict[str, Any]], options: GenerationOptions) -> AsyncIterator[Delta]:
        from asyncllm.sampling.structured import StructuredOutputs
        from asyncllm.sampling_params import RequestOutputKind, SamplingParams
        from asyncllm.tools import ChatDeltaStreamer, plan_tools
        from asyncllm.tools.choice import apply_plan
        from asyncllm.tools.template import guess_tool_parser, render_chat

        kwargs = options.sampling_kwargs()
        kwargs.setdefault("max_tokens", None)  # a chat model answers until it is done
        if options.json_schema is not None:
            kwargs["structured_outputs"] = StructuredOutputs(json=options.json_schema)
        params = SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)
        streamer = None
        if not isinstance(prompt, str):  # chat: rendered with its tools, replies read by the tool plan
            tokenizer = self.engine.tokenizer
            plan = plan_tools(options.tools, options.tool_choice, options.parallel_tool_calls,
                              auto_parser=self.tool_call_parser or guess_tool_parser(tokenizer.chat_template))
            params = apply_plan(params, plan)
            prompt = render_chat(tokenizer, list(prompt), plan.tools, takes_images=self.engine.engine.takes_images)
            streamer = ChatDeltaStreamer(plan.parser, None) if plan.parser is not None else None
        elif options.tools:
            raise InvalidRequestError("tools need chat messages, not a text prompt", param="tools")
        lora = options.lora_request
        answering = lora.lora_name if lora is not None else self.model_name
        if options.model is not None and options.model != answering:
            raise InvalidRequestError(f"this engine answers as {answering!r}, not {options.model!r} (in process an "
                                      "adapter is chosen with lora_request)", param="model")
        completion_tokens, text = 0, ""
        gen = self.engine.generate(prompt, params, lora_request=lora)
        try:
            async for out in gen:
                c = out.outputs[0]
                completion_tokens += len(c.token_ids)
                if streamer is None:
                    if c.text:
                        yield Delta(text=c.text)
                else:
                    text += c.text
                    delta = streamer.delta(text, final=out.finished) if c.text or out.finished else {}
                    if delta.get("content") or delta.get("tool_calls"):
                        yield Delta(text=delta.get("content", ""), tool_calls=delta.get("tool_calls"))
                if out.finished:
                    reason = c.finish_reason
                    if streamer is not None and streamer.called_tools and reason == "stop":
                        reason = "tool_calls"
                    yield Delta(finish_reason=reason, prompt_tokens=len(out.prompt_token_ids),
                                completion_tokens=completion_tokens, model=answering)
        finally:
            await gen.aclose()


class RemoteBackend:
    """An OpenAI-compatible server (e.g. `asyncllm serve`) at `base_url` (without /v1).
    `embed` asks for `model` when one was named, else the server's embedding model."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout) as client:
            response = client.get("/v1/models")
            response.raise_for_status()
            info = response.json()["data"][0]
        self.model_name = model or info["id"]
        self.requested_model = model
        self.context_window = int(info.get("max_model_len") or 4096)
        self._headers = headers

    async def embed(self, texts: list[str], dimensions: int | None = None,
                    truncate: bool = False) -> list[list[float]]:
        import httpx

        body: dict[str, Any] = {"input": texts, "encoding_format": "float"}
        if truncate:
            body["truncate_prompt_tokens"] = -1
        if self.requested_model is not None:
            body["model"] = self.requested_model
        if dimensions is not None:
            body["dimensions"] = dimensions
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self.timeout) as client:
            response = await client.post("/v1/embeddings", json=body)
        if response.status_code >= 400:
            raise _server_error(response)
        return [item["embedding"] for item in sorted(response.json()["data"], key=lambda d: d["index"])]

    async def stream(self, prompt: str | list[dict[str, Any]], options: GenerationOptions) -> AsyncIterator[Delta]:
        import httpx

        chat = not isinstance(prompt, str)
        if options.lora_request is not None:
            raise InvalidRequestError("a server picks its LoRA adapter by model name: pass model=<adapter name> "
                                      "(one of its --lora-modules), not lora_request", param="lora_request")
        body: dict[str, Any] = {"model": options.model or self.model_name, "stream": True,
                                "stream_options": {"include_usage": True}, **options.sampling_kwargs()}
        body["messages" if chat else "prompt"] = prompt
        if not chat and "max_tokens" not in body:
            body["max_tokens"] = None
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            if getattr(options, key) is not None:
                body[key] = getattr(options, key)
        if options.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                              "schema": options.json_schema}}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self.timeout) as client:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _server_error(response)
                finish = None
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(f"asyncllm server error: {event['error']['message']}")
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                        tool_calls = choice.get("delta", {}).get("tool_calls") if chat else None
                        if text or tool_calls:
                            yield Delta(text=text or "", tool_calls=tool_calls)
                        finish = choice.get("finish_reason") or finish
                    if event.get("usage"):
                        usage = event["usage"]
                        yield Delta(finish_reason=finish, prompt_tokens=usage["prompt_tokens"],
                                    completion_tokens=usage["completion_tokens"], model=event.get("model"))


def _server_error(response) -> RuntimeError:
    """A server's error response (read) → the error to raise, with the server's message."""
    message = response.json().get("error", {}).get("message", response.text)
    return RuntimeError(f"asyncllm server error {response.status_code}: {message}")


def make_backend(engine=None, base_url: str | None = None, api_key: str | None = None,
                 tool_call_parser: str | None = None, model: str | None = None) -> Backend:
    """`tool_call_parser` applies in process (a server reads replies with its own --tool-call-parser);
    `model` names the server's model (None: its first for generation, its embedding model for embed)."""
    if (engine is None) == (base_url is None):
        raise ValueError("pass exactly one of engine (in-process) or base_url (remote server)")
    return LocalBackend(engine, tool_call_parser) if engine is not None else RemoteBackend(base_url, api_key, model)


# ----------------------------------------------------------------------------- sync bridges

def run_sync(fn: Callable[[], Any]) -> Any:
    """Runs the coroutine `fn()` to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fn())
    return in_passing_thread(lambda: asyncio.run(fn()), name="asyncllm-sync-bridge")


_END = object()


def iterate_sync(make_iterator: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Iterates an async iterator from sync code (a helper thread runs its loop).

    Closing the returned generator early cancels the async iterator (so the request aborts).
    """
    items: queue.Queue = queue.Queue(maxsize=64)
    stop = threading.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []
    task_box: list[asyncio.Task] = []

    async def pump() -> None:
        iterator = make_iterator()
        try:
            async for item in iterator:
                while not stop.is_set():
                    try:
                        items.put_nowait(item)
                        break
                    except queue.Full:
                        await asyncio.sleep(0.005)
                if stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            if not stop.is_set():
                items.put(exc)
            return
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
        if not stop.is_set():
            items.put(_END)

    def target() -> None:
        loop = asyncio.new_event_loop()
        loop_box.append(loop)
        task = loop.create_task(pump())
        task_box.append(task)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="asyncllm-sync-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if loop_box and task_box and not task_box[0].done():
            loop_box[0].call_soon_threadsafe(task_box[0].cancel)
        thread.join(timeout=30)
