"""Context-free grammars (Lark, GBNF) in structured outputs: every output is in the grammar's
language, checked by an independent parser (the `lark` package), including languages no regex
can describe; bad grammars are the caller's error; a grammar past llguidance's limits fails
its request with the reason and nothing else."""
import re

import lark
import pytest

from asyncllm import GrammarError, SamplingParams, StructuredOutputs
from asyncllm.sampling.lark_grammar import LarkGrammars, to_lark
from asyncllm.sampling.structured import StructuredLimits

ARITHMETIC = r"""
?start: sum
?sum: product (SIGN product)~0..2
?product: atom ("*" atom)~0..1
?atom: NUMBER | "(" sum ")"
SIGN: "+" | "-"
NUMBER: /[0-9]{1,3}/
"""
# Balanced brackets around a word: not a regular language (no regex can count the depth).
NESTED = r"""
start: "[" start "]" | WORD
WORD: /[a-z]{1,8}/
"""
YES_NO_GBNF = 'root ::= answer "."\nanswer ::= "yes" | "no"'
LIST_GBNF = r'''root ::= "[" item ("," item)* "]"
item ::= [0-9] [0-9]?'''


def _params(grammar: str, seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=seed, max_tokens=kw.pop("max_tokens", 40),
                          structured_outputs=StructuredOutputs(grammar=grammar), **kw)


def _check(parser: lark.Lark, completion) -> None:
    """A finished output is a sentence of the grammar; one cut by max_tokens a prefix of one."""
    if completion.finish_reason == "stop":
        parser.parse(completion.text)  # raises if the text is not in the language
    else:
        assert completion.finish_reason == "length"
        parser.parse_interactive(completion.text).exhaust_lexer()  # raises at the first token out of place


def test_outputs_parse_under_the_grammar_when_sampling(default_llm):
    parser = lark.Lark(ARITHMETIC, parser="lalr")
    outs = default_llm.generate(["Compute: "] * 8, [_params(ARITHMETIC, seed) for seed in range(8)],
                                use_tqdm=False)
    for out in outs:
        _check(parser, out.outputs[0])
    texts = [o.outputs[0].text for o in outs]
    assert len(set(texts)) > 1, texts  # sampling is free inside the grammar
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 1
    with pytest.raises(lark.exceptions.UnexpectedInput):  # the check itself tells wrong text apart
        parser.parse_interactive("1+*2").exhaust_lexer()


def test_a_language_no_regex_describes(default_llm):
    parser = lark.Lark(NESTED, parser="lalr")
    params = [_params(NESTED, seed, max_tokens=60) for seed in range(6)]
    outs = default_llm.generate(["Nest a word in brackets: "] * 6, params, use_tqdm=False)
    for out in outs:
        _check(parser, out.outputs[0])
        text = out.outputs[0].text
        if out.outputs[0].finish_reason == "stop":
            depth = len(text) - len(text.lstrip("["))
            assert text == "[" * depth + text.strip("[]") + "]" * depth
    assert any(o.outputs[0].finish_reason == "stop" for o in outs)


def test_gbnf_grammars_as_llama_cpp_writes_them(default_llm):
    assert "::=" not in to_lark(YES_NO_GBNF)
    outs = default_llm.generate(["Is the sky blue?", "Some numbers:"],
                                [_params(YES_NO_GBNF, 1), _params(LIST_GBNF, 2)], use_tqdm=False)
    assert outs[0].outputs[0].text in ("yes.", "no.")
    assert re.fullmatch(r"\[[0-9]{1,2}(,[0-9]{1,2})*\]", outs[1].outputs[0].text), outs[1].outputs[0].text


def test_greedy_grammar_output_is_reproducible_and_shared(default_llm):
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputs(grammar=ARITHMETIC))
    first = default_llm.generate(["1+1="], params, use_tqdm=False)[0].outputs[0].text
    both = default_llm.generate(["1+1=", "1+1="], params, use_tqdm=False)
    assert [o.outputs[0].text for o in both] == [first, first]
    _check(lark.Lark(ARITHMETIC, parser="lalr"), both[0].outputs[0])


@pytest.mark.parametrize("grammar,message", [
    ("start: (", "invalid grammar"),
    ("start: missing_rule", "invalid grammar"),
    ("root ::= (", "GBNF"),
])
def test_invalid_grammars_are_the_callers_error(default_llm, grammar, message):
    with pytest.raises(GrammarError, match=message) as info:
        default_llm.generate(["x"], _params(grammar, 0), use_tqdm=False)
    assert info.value.param == "grammar"
    assert not default_llm.engine.has_unfinished_requests()


def test_grammar_size_is_bounded_before_compiling(default_gguf):
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    grammars = LarkGrammars(load_gguf_tokenizer(default_gguf), StructuredLimits(max_grammar_bytes=100))
    try:
        with pytest.raises(GrammarError, match="limit is 100"):
            grammars.submit(StructuredOutputs(grammar="start: " + " | ".join(f'"w{i}"' for i in range(50))))
    finally:
        grammars.shutdown()
    with pytest.raises(Exception, match="exactly one"):
        StructuredOutputs(grammar="start: \"a\"", regex="a")


def test_a_step_past_the_parsers_limits_fails_its_request_only(default_llm):
    """llguidance bounds each step (Earley items, lexer fuel); a grammar that needs more ends
    its own request with GrammarError and the reason, while the others in the step go on."""
    import llguidance

    core = default_llm.engine
    compiler = core.input_processor.grammars
    tight = LarkGrammars(compiler.tokenizer, compiler.limits, llguidance.LLParserLimits(step_max_items=50))
    compiler._lark, default = tight, compiler._lark
    try:
        ambiguous = 'start: x+\nx: "a" | "a" "a" | x x'  # its Earley items grow past 50 after one token
        core.add_request("tight", "x", _params(ambiguous, 0, max_tokens=20))
        core.add_request("free", "x", _params(ARITHMETIC, 0, max_tokens=8))
        finals = {}
        while core.has_unfinished_requests():
            finals.update((out.request_id, out) for out in core.step() if out.finished)
    finally:
        compiler._lark = default
        tight.shutdown()
    assert isinstance(finals["tight"].exception, GrammarError)
    assert "cannot continue: parser error: Too many items" in str(finals["tight"].exception)
    assert "\n" not in str(finals["tight"].exception)
    assert finals["free"].exception is None and finals["free"].outputs[0].text
    assert core.core.kv.num_used_blocks() == 0
