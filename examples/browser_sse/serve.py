"""Serves the browser chat page (and the OpenAI API it streams from over SSE).

    python examples/browser_sse/serve.py [port]     then open http://127.0.0.1:PORT/
"""
import sys

import uvicorn

from asyncllm import AsyncEngine
from asyncllm.server import build_app

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
app = build_app(AsyncEngine.from_args())
if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port)
