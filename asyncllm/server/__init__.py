"""The OpenAI-compatible HTTP API: `build_app(engine)` and `engine_lifespan(engine)`."""
from asyncllm.server.app import build_app, engine_lifespan

__all__ = ["build_app", "engine_lifespan"]
