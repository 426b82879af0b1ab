"""Structured outputs through the OpenAI API: response_format and vLLM's guided_* extras."""
import json
import re
import threading
import time

import httpx
import jsonschema
import openai

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 15},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x")


def test_response_format_json_schema_and_json_object(server):
    client = _client(server)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=80, temperature=0,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
        if c.choices]
    assert "".join(parts) == r.choices[0].message.content
    obj = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=60, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    text = obj.choices[0].text
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_guided_extras(server):
    client = _client(server)
    r = client.completions.create(model=MODEL, prompt="Phone:", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}],
                                       max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Person"}], max_tokens=80,
                                       temperature=0, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_schema_bomb_gets_400_while_other_streams_continue(server):
    streamed = {}

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 120, "stream": True,
                                "ignore_eos": True, "temperature": 0}) as resp:
            streamed["events"] = [line for line in resp.iter_lines() if line.startswith("data:")]

    worker = threading.Thread(target=stream)
    worker.start()
    deep: dict = {"type": "object"}
    node = deep
    for _ in range(100):
        node["properties"] = {"k": {"type": "object"}}
        node = node["properties"]["k"]
    bombs = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": deep}}},
        {"guided_json": {"enum": [f"v{i}" for i in range(100_000)]}},
        {"guided_regex": "(a|b"},
        {"guided_json": "{not json"},
        {"guided_choice": []},
        {"guided_regex": "a", "guided_choice": ["a"]},
        {"response_format": {"type": "json_schema"}},
    ]
    for extra in bombs:
        started = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra})
        assert r.status_code == 400, (extra.keys(), r.text[:200])
        assert r.json()["error"]["message"]
        assert time.monotonic() - started < 10
    worker.join(timeout=60)
    events = streamed["events"]
    assert events[-1] == "data: [DONE]" and len(events) > 100  # the other stream ran to the end
