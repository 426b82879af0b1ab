"""A choice spec is costed without parsing its alternation (plan's _choice_cost), and the cost
is what regex_cost gives the alternation: on random lists with shared prefixes, one-character
choices, duplicates, regex metacharacters and non-ASCII text."""
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.sampling.regex_cost import regex_cost
from asyncllm.sampling.structured import _choice_cost, _escape

CHARS = st.sampled_from(list("aab.*(|)\\xé€ 0"))
CHOICE = st.text(CHARS, min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.lists(CHOICE, min_size=1, max_size=12), st.text(CHARS, max_size=4))
def test_choice_cost_equals_the_parsed_alternation(choices, shared):
    choices = [shared + c for c in choices]
    assert _choice_cost(choices) == regex_cost("(" + "|".join(_escape(c) for c in choices) + ")")


def test_wide_one_character_choices_and_a_long_list():
    letters = [chr(ord("a") + i) for i in range(20)]
    assert _choice_cost(letters) == regex_cost("(" + "|".join(letters) + ")")
    assert _choice_cost(letters).wide_positions == 1
    many = [f"a long option number {i:05d} of many" for i in range(1000)]
    assert _choice_cost(many) == regex_cost("(" + "|".join(_escape(c) for c in many) + ")")
