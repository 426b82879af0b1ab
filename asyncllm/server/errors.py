"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, never a traceback."""
from __future__ import annotations

import logging

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from asyncllm.errors import (
    EngineDeadError,
    EngineOverloadedError,
    EngineShutdownError,
    InvalidRequestError,
    RequestFailedError,
)

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Maps any exception to the error a client should see (500s carry no internal detail)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), code="http_error")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or None
        if first.get("type") == "extra_forbidden":
            return APIError(400, f"{param} is not supported by this server (an unknown or unsupported field; it "
                                 "is refused rather than ignored)", param=param, code="unsupported_field")
        return APIError(400, f"invalid request: {param or 'body'}: {first.get('msg', 'invalid value')}",
                        param=param, code="invalid_type")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), type_="rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, (EngineDeadError, EngineShutdownError)):
        return APIError(503, "the engine is not available: " + type(exc).__name__, type_="service_unavailable",
                        code="engine_unavailable")
    if isinstance(exc, RequestFailedError):
        logger.warning("request failed: %s", exc)
        return APIError(500, "the request failed inside the engine", type_="internal_error", code="request_failed")
    logger.exception("unexpected error", exc_info=exc)
    return APIError(500, "internal server error", type_="internal_error", code="internal_error")


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return to_api_error(exc).response()


async def not_found_handler(request: Request, exc: Exception) -> JSONResponse:
    return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()


async def method_not_allowed_handler(request: Request, exc: Exception) -> JSONResponse:
    return APIError(405, f"method {request.method} not allowed on {request.url.path}",
                    code="method_not_allowed").response()
