"""API-key auth as ASGI middleware: deny by default, decided on the normalised path.

The decision uses the path relative to the app (mount prefix removed), with repeated
slashes collapsed, dot segments resolved and trailing slashes dropped. A path is public
only if it is in `public_paths` *and* was already in normal form, so no spelling of a
protected route (`//v1`, `%2F`, `/./`, trailing `/`, case) can pass as a public one.
"""
from __future__ import annotations

import hmac
import posixpath
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from asyncllm.server.errors import APIError


def normalize_path(path: str) -> str:
    normal = posixpath.normpath("/" + path.replace("\\", "/"))
    while normal.startswith("//"):
        normal = normal[1:]
    return normal.rstrip("/") or "/"


def relative_path(scope: Scope) -> str:
    path = scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, public_paths: Iterable[str]):
        self.app = app
        self._key = api_key.encode()
        self._public = {normalize_path(p) for p in public_paths}

    def is_public(self, scope: Scope) -> bool:
        raw = relative_path(scope)
        normal = normalize_path(raw)
        return normal in self._public and (raw == normal or raw == normal + "/" and normal == "/")

    def authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self._key)
                return False
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_public(scope) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                         type_="authentication_error", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)
