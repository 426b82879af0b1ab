"""The OpenAI-compatible API through the official `openai` client against a real uvicorn."""
import json
import time

import anyio
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncllm import AsyncEngine
from asyncllm.server import build_app
from server_helpers import RunningServer

pytestmark = pytest.mark.timeout(300)
MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name a color."}]


def _wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.engine.has_unfinished_requests() and not engine._thread._inbox:
            return
        time.sleep(0.02)
    raise AssertionError("engine did not go idle")


def test_models_health_version(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_completions_stream_equals_non_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    kwargs = dict(model=MODEL, prompt="The three primary colors are", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs)
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(parts) == full.choices[0].text and len(parts) > 1
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": kwargs["prompt"]}).json()
    assert full.usage.prompt_tokens == tokens["count"]
    assert full.usage.completion_tokens == 24 or full.choices[0].finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == kwargs["prompt"]


def test_completions_batch_prompts_n_and_logprobs(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.completions.create(model=MODEL, prompt=["One plus one is", "The sky is"], n=2, max_tokens=6,
                                  temperature=0.8, seed=3, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    stop = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert stop.choices[0].finish_reason == "stop" and " 7" not in stop.choices[0].text


async def _async_chat(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    full = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    parts, usage, roles = [], None, []
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            parts.append(c.delta.content or "")
    await client.close()
    return full, "".join(parts), usage, roles


def test_chat_async_client_stream_equals_non_stream_with_usage(server):
    full, streamed, usage, roles = anyio.run(_async_chat, server.url)
    assert streamed == full.choices[0].message.content and streamed
    assert roles[0] == "assistant"
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_sync_client_options(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."}] + CHAT,
                                       max_completion_tokens=8, temperature=0.9, top_p=0.9, seed=11, n=2,
                                       presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=3,
                                       logit_bias={"28": -100})
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason in ("stop", "length")
        assert len(c.logprobs.content) >= 1 and len(c.logprobs.content[0].top_logprobs) == 3
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0.9, seed=11)
    again2 = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0.9, seed=11)
    assert again.choices[0].message.content == again2.choices[0].message.content


def test_mid_stream_disconnect_aborts_and_frees_blocks(server, engine):
    before = dict(engine.stats().requests_finished)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/completions",
                           json={"prompt": "Tell a very long story.", "max_tokens": 400, "stream": True,
                                 "ignore_eos": True}) as response:
            lines = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    lines += 1
                if lines >= 3:
                    break
    _wait_idle(engine)
    assert engine.engine.core.kv.num_used_blocks() == 0
    after = engine.stats().requests_finished
    assert after.get("abort", 0) == before.get("abort", 0) + 1


def test_non_streaming_disconnect_aborts(server, engine):
    before = dict(engine.stats().requests_finished)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "Story:", "max_tokens": 500, "ignore_eos": True},
                   timeout=0.5)
    deadline = time.monotonic() + 15
    while engine.stats().requests_finished.get("abort", 0) == before.get("abort", 0):
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.05)
    _wait_idle(engine)
    assert engine.engine.core.kv.num_used_blocks() == 0


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -9}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": "nope"}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": 12}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [999999999]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "temperature": 0}, 400, "best_of"),
    ("/v1/completions", {"prompt": "word " * 9000}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 99}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
    # tool_choice "auto" (the default with tools) needs --enable-auto-tool-choice: a 400 saying so
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "code_interpreter"}], "tool_choice": "required"},
     400, "tools[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "n": -1}, 400, "n"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


def test_bad_requests_get_openai_errors_never_5xx(server):
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, body, status, param in BAD_REQUESTS:
            r = client.post(path, json=body)
            statuses.append(r.status_code)
            assert r.status_code == status, (path, body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            if param is not None:
                assert error["param"] is not None and param in error["param"], (body, error)
            assert "Traceback" not in r.text
        raw_cases = [
            ("POST", "/v1/completions", b"{not json", 400),
            ("POST", "/v1/completions", b"[1, 2, 3]", 400),
            ("POST", "/v1/completions", b"\xff\xfe", 400),
            ("POST", "/v1/chat/completions", b"", 400),
            ("POST", "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413),
            ("GET", "/v1/completions", None, 405),
            ("POST", "/v1/nothing-here", b"{}", 404),
            ("GET", "/v2/models", None, 404),
        ]
        for method, path, content, status in raw_cases:
            r = client.request(method, path, content=content, headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code == status, (method, path, r.text[:200])
            assert r.json()["error"]["message"]
    assert len(statuses) >= 35 and all(400 <= s < 500 for s in statuses)


def test_metrics_parse_with_prometheus_parser(server):
    openai.OpenAI(base_url=server.url + "/v1", api_key="x").completions.create(
        model=MODEL, prompt="Metrics test", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ["asyncllm_http_requests", "asyncllm_time_to_first_token_seconds",
                 "asyncllm_inter_token_latency_seconds", "asyncllm_e2e_request_latency_seconds",
                 "asyncllm_kv_cache_usage_ratio", "asyncllm_num_requests_running", "asyncllm_num_requests_waiting"]:
        assert name in families, name
    ttft_count = [s for s in families["asyncllm_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft_count[0].value >= 1
    statuses = {s.labels["status"] for s in families["asyncllm_http_requests"].samples}
    assert "200" in statuses


def test_overload_gets_429_with_retry_after():
    engine = AsyncEngine.from_args(dtype="float32", max_num_seqs=1, max_waiting_requests=1)
    srv = RunningServer(build_app(engine))
    try:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                async def one(i):
                    return await client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 40,
                                                                      "ignore_eos": True})
                results = []
                async with anyio.create_task_group() as tg:
                    for i in range(6):
                        tg.start_soon(lambda i=i: _append(results, one(i)))
                return results

        results = anyio.run(main)
        codes = sorted(r.status_code for r in results)
        assert 429 in codes and 200 in codes
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.stop()


async def _append(results, coro):
    results.append(await coro)


def test_dead_engine_gives_503():
    engine = AsyncEngine.from_args(dtype="float32")
    srv = RunningServer(build_app(engine))
    try:
        def crash():
            raise RuntimeError("injected crash")

        engine.engine.core.scheduler.schedule = crash
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": CHAT}, timeout=30)
        assert r.status_code == 503
        assert "injected" not in r.text  # no internal detail leaks
    finally:
        srv.stop()


def test_streamed_error_event_shape(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True, "max_tokens": 3})
        events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        assert all("choices" in json.loads(e) for e in events[:-1])


def test_chat_template_override_and_page_toggle(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    engine = AsyncEngine.from_args(dtype="float32", chat_template=str(template))
    srv = RunningServer(build_app(engine, browser_page=False))
    try:
        tokens = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        text = httpx.post(srv.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text == "[user] hi\n[assistant] "
        r = openai.OpenAI(base_url=srv.url + "/v1", api_key="x").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens == tokens["count"]
        assert httpx.get(srv.url + "/").status_code == 404
    finally:
        srv.stop()
