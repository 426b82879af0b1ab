"""Hostile and odd input against a real uvicorn: always a 4xx in OpenAI's shape naming the
field, never a 5xx; unsupported fields refused, not dropped; vLLM's structured_outputs and
prompt_logprobs; echo with logprobs as OpenAI defines it."""
import json
import math
import re
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name a color."}]


def _post(server, path, body, raw: bytes | None = None):
    content = raw if raw is not None else json.dumps(body).encode()  # ensure_ascii: "\ud800" stays an escape
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def _nested(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


HOSTILE = [
    # integers beyond int64 / C long, streamed or not
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "top_k": 2**63, "temperature": 1}, "top_k"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "top_k": 2**63, "temperature": 1, "stream": True},
     "top_k"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2**64}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hello", "seed": -(2**70)}, "seed"),
    ("/v1/completions", {"prompt": "Hello", "n": 2**40}, "n"),
    ("/v1/completions", {"prompt": "Hello", "priority": 2**63}, "priority"),
    ("/v1/completions", {"prompt": "Hello", "stop_token_ids": [2**63]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hello", "allowed_token_ids": [2**80]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": [2**63]}, "prompt"),
    ("/v1/completions", {"prompt": "Hello", "logit_bias": {str(2**70): 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hello", "logprobs": 2**63}, "logprobs"),
    ("/detokenize", {"tokens": [2**63]}, "tokens"),
    # lone surrogates
    ("/v1/completions", {"prompt": "\ud800abc"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udfff"}]}, "messages.0.content"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "Hello", "bad_words": ["x\ud800"]}, "bad_words"),
    ("/v1/completions", {"prompt": "Hello", "stop": ["\udc00"]}, "stop"),
    # renderer arguments smuggled in as template variables
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs.add_generation_prompt"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"tokenizer": 1}},
     "chat_template_kwargs.tokenizer"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    # fields that would change the output and are not supported: refused, not dropped
    ("/v1/chat/completions", {"messages": CHAT, "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "Hello", "use_beam_search": True, "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "Hello", "use_beam_search": True, "n": 3, "best_of": 2}, "n"),
    ("/v1/completions", {"prompt": "Hello", "structured_outputs": {"structural_tag": {"type": "structural_tag"}}},
     "structured_outputs.structural_tag"),
    # grammars that do not parse (GBNF has no single quotes; a rule used and never defined)
    ("/v1/completions", {"prompt": "Hello", "guided_grammar": "root ::= 'a'"}, "grammar"),
    ("/v1/completions", {"prompt": "Hello", "structured_outputs": {"grammar": "start: nowhere"}}, "grammar"),
    ("/v1/chat/completions", {"messages": CHAT, "structured_outputs": {"grammar": "start: nowhere"}, "stream": True},
     "grammar"),
    ("/v1/completions", {"prompt": "Hello", "structured_outputs": {"regex": "a+", "choice": ["b"]}},
     "structured_outputs"),
    ("/v1/completions", {"prompt": "Hello", "length_penalty": 0.5}, "length_penalty"),  # without beam search
    ("/v1/chat/completions", {"messages": CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}, *CHAT]},
     "messages"),
    ("/v1/completions", {"prompt": "Hello", "stream_options": {"continuous_usage_stats": True}},
     "continuous_usage_stats"),
]


@pytest.mark.parametrize("path,body,param", HOSTILE, ids=[f"{i}-{c[2]}" for i, c in enumerate(HOSTILE)])
def test_hostile_bodies_get_400_naming_the_field(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] is not None and param in error["param"], error


@pytest.mark.parametrize("raw", [
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ('{"messages": [{"role": "user", "content": "hi"}], "x": ' + _nested(2000) + "}").encode(),
    b"[" * 500_000,
])
def test_deep_nesting_is_refused_before_parsing(server, raw):
    r = _post(server, "/v1/chat/completions", None, raw)
    assert r.status_code == 400 and "nests" in r.json()["error"]["message"]


def test_openai_extras_that_change_nothing_are_accepted(server):
    r = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "user": "u1", "metadata": {"k": "v"},
                                         "store": False})
    assert r.status_code == 200, r.text


def test_structured_outputs_field_as_vllm_and_outlines_send_it(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    r = client.completions.create(model=MODEL, prompt="Phone:", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5,
                                       extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert r.choices[0].message.content in ("red", "blue")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"json": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    # A context-free grammar, as vLLM takes it (structured_outputs.grammar, the older guided_grammar).
    gbnf = 'root ::= "(" inner ")"\ninner ::= [a-z]+ | "(" inner ")"'
    for extra in ({"structured_outputs": {"grammar": gbnf}}, {"guided_grammar": gbnf}):
        r = client.completions.create(model=MODEL, prompt="Brackets:", max_tokens=20, temperature=0.7, seed=4,
                                      extra_body=extra)
        text = r.choices[0].text
        depth = len(text) - len(text.lstrip("("))
        assert r.choices[0].finish_reason == "stop" and depth >= 1, text
        assert re.fullmatch(r"\(" * depth + "[a-z]+" + r"\)" * depth, text), text


def test_prompt_logprobs_match_the_engine(server, engine):
    from asyncllm import SamplingParams

    body = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]["prompt_logprobs"]

    import anyio

    async def direct():
        return await engine.complete(body["prompt"], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))

    out = anyio.run(direct)
    assert served[0] is None and len(served) == len(out.prompt_token_ids)
    for position, token_id, expected in zip(served[1:], out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert str(token_id) in position  # the prompt's own token is always there
        for t, lp in expected.items():
            assert math.isclose(position[str(t)]["logprob"], lp.logprob, abs_tol=1e-4)
    chat = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "prompt_logprobs": 0})
    assert chat.status_code == 200 and chat.json()["prompt_logprobs"][0] is None


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_covers_prompt_and_completion(server, stream):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    prompt = "One, two, three,"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
        text = "".join(c.choices[0].text for c in chunks)
        first = chunks[0].choices[0].logprobs
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    else:
        r = client.completions.create(**kwargs)
        text, first = r.choices[0].text, r.choices[0].logprobs
        tokens = first.tokens
    assert text.startswith(prompt)
    n_prompt = len(_post(server, "/tokenize", {"prompt": prompt}).json()["tokens"])
    assert first.token_logprobs[0] is None and first.top_logprobs[0] is None  # the first token has no context
    assert all(lp is not None for lp in first.token_logprobs[1:])
    assert len(tokens) == n_prompt + 4
    assert "".join(tokens) == text
    assert first.text_offset[:3] == sorted(first.text_offset[:3])


# ------------------------------------------------------------------ property: never a 5xx

_KEYS = ["prompt", "messages", "n", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
         "logprobs", "echo", "stream", "logit_bias", "stop_token_ids", "bad_words", "allowed_token_ids",
         "min_tokens", "presence_penalty", "repetition_penalty", "response_format", "guided_regex",
         "guided_choice", "guided_json", "structured_outputs", "prompt_logprobs", "priority", "user",
         "chat_template_kwargs", "top_logprobs", "stream_options", "best_of", "ignore_eos", "model", "unknown"]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, -1, 2**31, 2**63 - 1, 2**63, 2**64]), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "", "json_object", "text", "{", "user"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["type", "role", "content", "schema", "json",
                                                                  "regex", "choice", "x", "1"]), inner,
                                                 max_size=3)), max_leaves=8)


@st.composite
def _bodies(draw):
    chat = draw(st.booleans())
    body = {"messages": CHAT} if chat else {"prompt": "Hi"}
    # Bounded generation: a valid max_tokens stays small (None would mean "up to the context").
    body["max_tokens"] = draw(st.sampled_from([2, 0, -1, 3, 2**31, 2**63, 2**64, "3", 1.5, [], {}]))
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=3, unique=True)):
        body[key] = draw(_VALUES)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=_bodies())
def test_any_json_body_gets_200_or_4xx(server, case):
    path, body = case
    r = _post(server, path, body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code == 200 and body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")
    elif r.status_code != 200:
        assert r.json()["error"]["message"]


# ------------------------------------------------------------------ structured-output DoS, end to end

def test_hostile_structures_get_400_and_never_starve_a_choice(server):
    started = time.monotonic()
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4, "guided_regex": "[a-z]{1,60000}"})
    assert r.status_code == 400 and "grammar_max_positions" in r.json()["error"]["message"]
    assert time.monotonic() - started < 1
    slow: list[httpx.Response] = []
    body = {"prompt": "x", "max_tokens": 4, "guided_regex": "(a|b)*a(a|b){1100}"}  # a DFA blow-up
    threads = [threading.Thread(target=lambda i=i: slow.append(
        _post(server, "/v1/completions", {**body, "guided_regex": body["guided_regex"] + "c" * i}))) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both heavy workers are now held
    started = time.monotonic()
    r = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "guided_choice": ["yes", "no"]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("yes", "no")
    assert time.monotonic() - started < 3
    for t in threads:
        t.join(timeout=60)
    assert [x.status_code for x in slow] == [400, 400]
    assert all("longer than the limit" in x.json()["error"]["message"] for x in slow)
