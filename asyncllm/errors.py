"""Exceptions the engine raises to its callers.

Each one maps onto an HTTP status in the server; `ValueError` subclasses are the
caller's fault (400), the others are the engine's state (429, 503).
"""
from __future__ import annotations


class AsyncLLMError(Exception):
    """Base class of every asyncllm error."""


class InvalidRequestError(AsyncLLMError, ValueError):
    """The request can never be served as given (bad parameter, prompt too long...).

    `param` names the offending field, as the OpenAI error shape wants it.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt exceeds `max_model_len` or the whole KV cache."""


class EngineOverloadedError(AsyncLLMError):
    """The waiting queue is full (`max_waiting_requests`); retry later."""


class EngineDeadError(AsyncLLMError):
    """The engine thread has died; no request can be served any more."""


class EngineShutdownError(AsyncLLMError):
    """The engine is shutting down or was shut down; no new requests are accepted."""


class RequestFailedError(AsyncLLMError):
    """One request failed inside the engine; the others go on."""
