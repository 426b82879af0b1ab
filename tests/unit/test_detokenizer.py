"""Incremental detokenizer: UTF-8 safety and stop strings across token boundaries."""
import pytest

from asyncllm.engine.detokenizer import IncrementalDetokenizer
from asyncllm.model.tokenizer import load_gguf_tokenizer


@pytest.fixture(scope="module")
def tok(default_gguf):
    return load_gguf_tokenizer(default_gguf)


@pytest.mark.parametrize("text", ["こんにちは世界、東京タワー", "emoji 🐶🐱🦊👩‍👩‍👧 mix", "Ελληνικά ü ß €", "plain ascii text"])
def test_deltas_join_to_text_without_replacement_chars(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), True, [], False)
    deltas = []
    for t in ids:
        before = len(detok.text)
        detok.add_token(t)
        deltas.append(detok.text[before:])
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tok.decode(ids)


def test_stop_string_across_tokens_and_hold_back(tok):
    text = "alpha beta gamma delta"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], True, ["a gam"], False)
    hit = None
    for t in ids:
        hit = detok.add_token(t)
        if hit:
            break
        assert "a gam" not in detok.text[:detok.emittable_length(False)]
    assert hit == "a gam"
    assert detok.text == "alpha bet"
