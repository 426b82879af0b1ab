"""Structured outputs: every output parses and validates; free requests are untouched."""
import json
import random
import re
import time

import jsonschema
import pytest
from pydantic import BaseModel, Field

from asyncllm import AsyncEngine, GrammarError, SamplingParams, StructuredOutputs

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100}, "y": {"type": "integer", "minimum": -100,
                                                                          "maximum": 100}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 30}},
     "required": ["email"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    {"type": "object", "properties": {"title": S, "subtitle": S}, "required": ["title"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "boolean"}]}}, "required": ["value"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": S, "address": {"type": "object", "properties": {"city": S, "zip": {
            "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
        "required": ["name", "address"]}}, "required": ["user"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "number", "minimum": 0,
                                                                           "maximum": 1}, "maxItems": 3}},
     "required": ["scores"]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["note"]},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "count": {
        "type": "integer", "minimum": 0, "maximum": 50}}, "required": ["status", "count"]},
    {"type": "object", "properties": {"time": {"type": "string", "format": "time"}}, "required": ["time"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 6}},
     "required": ["word"]},
]

REGEXES = {
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "email": r"[a-z]{3,10}@[a-z]{3,8}\.(com|org|net)",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "ipv4": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    "time": r"([01]\d|2[0-3]):[0-5]\d",
}


def _chat(text):
    return [{"role": "user", "content": text}]


def test_json_schema_corpus_greedy_and_sampled(default_llm):
    assert len(SCHEMAS) >= 20
    prompts, params, schemas = [], [], []
    for schema in SCHEMAS:
        for sampling in (dict(temperature=0), dict(temperature=0.8, seed=7)):
            prompts.append(_chat("Reply with a JSON value for this schema: " + json.dumps(schema)))
            params.append(SamplingParams(max_tokens=160, structured_outputs=StructuredOutputs(json=schema),
                                         **sampling))
            schemas.append(schema)
    outputs = default_llm.chat(prompts, params, use_tqdm=False)
    checker = jsonschema.FormatChecker()
    for schema, out in zip(schemas, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        value = json.loads(completion.text)
        jsonschema.validate(value, schema, format_checker=checker)


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_regexes_full_match(default_llm, name):
    pattern = REGEXES[name]
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        out = default_llm.chat(_chat(f"Give me an example {name}."), SamplingParams(
            max_tokens=40, structured_outputs=StructuredOutputs(regex=pattern), **sampling), use_tqdm=False)[0]
        text = out.outputs[0].text
        assert re.fullmatch(pattern, text), (name, text)
        assert out.outputs[0].finish_reason == "stop"


def test_choice_and_eos_only_when_accepting(default_llm):
    choices = ["positive", "negative", "neutral"]
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=1)):
        out = default_llm.chat(_chat("Sentiment of 'I love it'?"), SamplingParams(
            max_tokens=10, structured_outputs=StructuredOutputs(choice=choices), **sampling), use_tqdm=False)[0]
        assert out.outputs[0].text in choices
    # EOS is allowed only in an accepting state: exactly four digits, then it must stop.
    exact = default_llm.generate("Year:", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                         structured_outputs=StructuredOutputs(regex=r"\d{4}")),
                                 use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"\d{4}", exact.text) and exact.finish_reason == "stop"
    cut = default_llm.generate("Year:", SamplingParams(max_tokens=2, temperature=0,
                                                       structured_outputs=StructuredOutputs(regex=r"\d{4}")),
                               use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2


def test_mixed_batch_leaves_free_requests_untouched(default_llm):
    free_prompts = ["The history of Rome", "def add(a, b):", "My favourite food is"]
    free = SamplingParams(max_tokens=20, temperature=0)
    alone = default_llm.generate(free_prompts, free, use_tqdm=False)
    constrained = SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputs(json=SCHEMAS[0]))
    mixed = default_llm.generate(free_prompts + ["Person:", "Another person:"],
                                 [free] * 3 + [constrained] * 2, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    for o in mixed[3:]:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS[0])


def test_bombs_and_bad_specs_fail_fast_with_clear_errors(default_llm):
    deep = {"type": "object"}
    node = deep
    for _ in range(60):
        node["properties"] = {"a": {"type": "object"}}
        node = node["properties"]["a"]
    huge_enum = {"enum": [f"value-{i}" for i in range(50_000)]}
    cases = [StructuredOutputs(json=deep), StructuredOutputs(json=huge_enum), StructuredOutputs(regex="(unclosed"),
             StructuredOutputs(json={"type": "object", "properties": {"x": {"$ref": "#/nope"}}})]
    for spec in cases:
        started = time.monotonic()
        with pytest.raises(GrammarError):
            default_llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=spec), use_tqdm=False)
        assert time.monotonic() - started < 5
    for bad in [dict(), dict(json={"type": "object"}, regex="a"), dict(choice=[])]:
        with pytest.raises(ValueError):
            StructuredOutputs(**bad)
    assert not default_llm.engine.has_unfinished_requests()


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=50_000_000)


def test_pydantic_model_in_and_out():
    engine = AsyncEngine.from_args(dtype="float32")
    import anyio

    async def main():
        async with engine:
            city = await engine.complete_json(_chat("Describe Paris as JSON."), City, max_tokens=80, temperature=0)
            assert isinstance(city, City) and city.name
            text = "".join([t async for t in engine.stream(_chat("Describe Rome."), json_schema=City,
                                                           max_tokens=80, temperature=0)])
            City.model_validate_json(text)

    anyio.run(main)


def test_unbounded_json_cut_by_max_tokens_reports_length(default_llm):
    class Loose(BaseModel):
        n: int

    out = default_llm.generate("Number:", SamplingParams(max_tokens=3, temperature=0,
                                                         structured_outputs=StructuredOutputs(json=Loose)),
                               use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    from asyncllm.engine.async_engine import parse_json_output

    with pytest.raises(ValueError, match="max_tokens"):
        parse_json_output(out, Loose)


@pytest.mark.parametrize("lo,hi,integer", [(-100, 100, True), (0, 1, False), (0, 1000, False), (-5, -2, False),
                                          (-3, 4, False), (7, 7, True), (0, 5000, True), (-2500, 3001, False),
                                          (1234, 987654, True), (0, 50_000_000, True)])
def test_numeric_range_regex_is_exact(lo, hi, integer):
    from asyncllm.sampling.structured import _number_regex

    rx = re.compile(_number_regex(lo, hi, integer))
    near = [v for edge in (lo, hi, 0) for v in range(edge - 30, edge + 30)]
    rng = random.Random(lo ^ hi)
    spread = [rng.randint(2 * lo - 10, 2 * hi + 10) for _ in range(400)]
    values = [str(v) for v in near + spread] + [f"{v}.5" for v in near] + ["00", "007", "-0", "01.5"]
    for v in values:
        inside = lo <= float(v) <= hi and (not integer or "." not in v) and not v.startswith("-0") \
            and not re.match(r"-?0[0-9]", v)
        assert bool(rx.fullmatch(v)) == inside, (lo, hi, v)


def test_wide_bounds_hold_when_sampling(default_llm):
    """A bound of 50,000,000 (once only a digit count) holds on every sample at temperature 0.8."""
    params = SamplingParams(n=8, max_tokens=80, temperature=0.8, seed=3,
                            structured_outputs=StructuredOutputs(json=City))
    (out,) = default_llm.chat([{"role": "user", "content": "Describe a big city as JSON."}], params, use_tqdm=False)
    cities = [City.model_validate_json(c.text) for c in out.outputs if c.finish_reason == "stop"]
    assert len(cities) >= 6 and all(0 <= city.population <= 50_000_000 for city in cities)
