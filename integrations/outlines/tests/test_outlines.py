"""outlines' generators over asyncllm in process, against the real outlines package: pydantic,
regex, choice and context-free grammar outputs, sync and async, whole, batched and streamed."""
import re
from pathlib import Path
from typing import Literal

import anyio
import lark
import outlines
import pytest
from outlines.inputs import Chat
from outlines.types import CFG, Regex
from outlines_asyncllm import from_asyncllm
from pydantic import BaseModel, Field

from asyncllm import LLM, AsyncEngine, SamplingParams
from asyncllm.sampling.structured import StructuredOutputs

PROMPT = "Describe a pet as JSON."
GREEDY = {"max_tokens": 60, "temperature": 0}


class Pet(BaseModel):
    name: str = Field(max_length=20)
    legs: int = Field(ge=0, le=8)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(dtype="float32")
    yield engine
    engine.shutdown()


def test_sync_generator_pydantic_regex_choice(llm):
    model = from_asyncllm(llm)
    pet = Pet.model_validate_json(outlines.Generator(model, Pet)(PROMPT, **GREEDY))
    # The same request through asyncllm directly (chat template, the schema in the engine).
    direct = llm.chat([{"role": "user", "content": PROMPT}], SamplingParams(
        **GREEDY, structured_outputs=StructuredOutputs(json=Pet)), use_tqdm=False)[0].outputs[0].text
    assert Pet.model_validate_json(direct) == pet
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", model("A phone number:", Regex(r"[0-9]{3}-[0-9]{4}"), **GREEDY))
    assert model("Is the sky blue?", Literal["yes", "no"], **GREEDY) in ("yes", "no")
    assert model(Chat([{"role": "user", "content": PROMPT}]), Pet, **GREEDY) == direct
    batch = outlines.Generator(model, Pet).batch([PROMPT, "Describe a spider as JSON."], **GREEDY)
    assert [Pet.model_validate_json(text) for text in batch][0] == pet
    streamed = list(model.stream(PROMPT, Pet, **GREEDY))
    assert len(streamed) > 2 and "".join(streamed) == direct
    pieces = model.stream("Write a long story.", max_tokens=200, temperature=0)
    next(pieces), next(pieces)
    pieces.close()  # leaving early aborts the request
    assert not llm.engine.has_unfinished_requests() and llm.engine.core.kv.num_used_blocks() == 0
    # A context-free grammar (outlines' own arithmetic Lark file), checked by the lark parser.
    arithmetic = CFG.from_file(str(Path(outlines.__file__).parent / "grammars" / "arithmetic.lark"))
    expression = model("Write 2 plus 3 times 4:", arithmetic, max_tokens=24, temperature=0)
    lark.Lark(arithmetic.definition, parser="lalr").parse_interactive(expression).exhaust_lexer()
    assert re.match(r"-?\(*[0-9]", expression), expression
    with pytest.raises(ValueError, match="not both"):
        model(PROMPT, Pet, sampling_params=SamplingParams(**GREEDY), max_tokens=5)


def test_async_generator_equals_sync(engine, llm):
    sync_text = from_asyncllm(llm)(PROMPT, Pet, **GREEDY)
    model = from_asyncllm(engine)

    async def run():
        generator = outlines.Generator(model, Pet)
        whole = await generator(PROMPT, **GREEDY)
        batch = await generator.batch([PROMPT, PROMPT], **GREEDY)
        streamed = [piece async for piece in generator.stream(PROMPT, **GREEDY)]
        choice = await model("Is the sky blue?", Literal["yes", "no"], **GREEDY)
        return whole, batch, streamed, choice

    whole, batch, streamed, choice = anyio.run(run)
    assert whole == sync_text and batch == [whole, whole] and "".join(streamed) == whole
    assert isinstance(Pet.model_validate_json(whole), Pet) and choice in ("yes", "no")
    assert engine.engine.core.kv.num_used_blocks() == 0
