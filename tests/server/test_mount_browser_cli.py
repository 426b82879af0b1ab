"""Mounted in FastAPI (with and without the lifespan helper), the chat page in Chromium, the CLI."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from browser_helpers import HeadlessChromium
from server_helpers import RunningServer, stop_process

from asyncllm import AsyncEngine

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Name a fruit."}]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("use_lifespan", [True, False])
def test_fastapi_app_with_mounted_engine(use_lifespan):
    engine = AsyncEngine.from_args(dtype="float32")
    app = _example("fastapi_mount").create_app(engine, use_lifespan=use_lifespan)
    srv = RunningServer(app, lifespan="on" if use_lifespan else "off")
    try:
        assert httpx.get(srv.url + "/hello").json() == {"message": "my own route"}
        client = openai.OpenAI(base_url=srv.url + "/llm/v1", api_key="unused")
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=8,
                                           temperature=0)
        assert r.choices[0].message.content
        with httpx.stream("GET", srv.url + "/joke", params={"topic": "dogs"}, timeout=60) as resp:
            events = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
        assert events[-1] == "[DONE]" and "".join(json.loads(e)["text"] for e in events[:-1])
        assert httpx.get(srv.url + "/llm/health").status_code == 200
        assert "asyncllm" in httpx.get(srv.url + "/llm/").text
    finally:
        srv.stop()
    if use_lifespan:
        assert not engine.is_healthy  # the parent's lifespan shut the engine down with the app
    else:
        engine.shutdown()


@pytest.mark.timeout(180)
def test_chat_page_streams_in_headless_chromium(server, tmp_path):
    expected = openai.OpenAI(base_url=server.url + "/v1", api_key="x").chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say hello"}], max_tokens=256,
        temperature=0).choices[0].message.content
    browser = HeadlessChromium(f"{server.url}/?q=Say%20hello&temperature=0")
    try:
        lengths = []  # the answer's length each time we look: it grows while tokens stream in
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = browser.evaluate("(() => { const a = document.querySelector('.assistant');"
                                     " return a ? [a.textContent, a.dataset.done || '', a.dataset.chunks || '0']"
                                     " : null; })()")
            if state is not None:
                lengths.append(len(state[0]))
                if state[1] == "1":
                    break
            time.sleep(0.01)
        text, done, chunks = state
        browser.screenshot(str(tmp_path / "page.png"))
    finally:
        browser.close()
    assert done == "1"
    assert int(chunks) > 1  # several SSE updates, not one response
    assert len({n for n in lengths if n > 0}) > 1  # the visible text grew step by step
    assert text == expected
    assert (tmp_path / "page.png").stat().st_size > 1000


@pytest.mark.timeout(120)
def test_cli_serve_and_generate(minilm_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "asyncllm.cli", "serve", "--port", "0", "--dtype", "float32",
                             "--served-model-name", "smol", "--api-key", "k", "--embedding-model", minilm_path,
                             "--embedding-model-name", "minilm"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 90
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            match = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
            assert proc.poll() is None, "".join(lines)
        assert url, "".join(lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k")
        assert [m.id for m in client.models.list().data][0] == "smol"
        r = client.completions.create(model="smol", prompt="Hello", max_tokens=4, temperature=0)
        assert r.choices[0].text
        assert "minilm" in [m.id for m in client.models.list().data]  # one process, two models
        assert len(client.embeddings.create(model="minilm", input="Hello").data[0].embedding) == 384
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        stop_process(proc)
    gen = subprocess.run([sys.executable, "-m", "asyncllm.cli", "generate", "What is 2+2?", "--max-tokens", "16",
                          "--dtype", "float32"], capture_output=True, text=True, timeout=90, env=env)
    assert gen.returncode == 0, gen.stderr
    assert "4" in gen.stdout
    assert "first token after" in gen.stderr
