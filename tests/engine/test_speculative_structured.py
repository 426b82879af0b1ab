"""Speculative proposals for structured-output requests: the grammar walks the proposals one by
one (stopping at the first it refuses), keeps the mask of every position, and is rolled back; the
verification rows are masked each by its own position's mask, and the kept tokens are accepted for
good. The output is the structured decoding of plain decoding, in fewer forwards."""
import pytest

from asyncllm import LLM, SamplingParams, StructuredOutputs

pytestmark = pytest.mark.timeout(300)

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "disable_by_batch_size": None}


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def engines(request, tiny_models):
    path = tiny_models("LlamaForCausalLM")
    config = NGRAM if request.param == "ngram" else {"method": "draft_model", "model": path,
                                                       "num_speculative_tokens": 4, "disable_by_batch_size": None}
    plain = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    spec = LLM(path, dtype="float32", kv_cache_memory=16 << 20, speculative_config=config)
    yield plain, spec
    plain.engine.shutdown()
    spec.engine.shutdown()


@pytest.mark.parametrize("structure", [
    StructuredOutputs(regex=r"(red|green|blue)( (red|green|blue)){11}"),  # outlines-core's guide
    StructuredOutputs(grammar='start: item (" " item)~11\nitem: "red" | "green" | "blue"'),  # llguidance
    StructuredOutputs(json={"type": "object", "properties": {"colors": {"type": "array", "items": {
        "enum": ["red", "green", "blue"]}, "minItems": 8, "maxItems": 8}}, "required": ["colors"]}),
])
def test_constrained_requests_verify_proposals_and_decode_as_without(structure, engines, request):
    plain, spec = engines
    prompts = ["red green blue red green blue red", "blue blue green red green blue"]
    params = SamplingParams(max_tokens=60, temperature=0, structured_outputs=structure)
    plain_steps = plain.engine.core.num_steps
    want = [o.outputs[0] for o in plain.generate(prompts, params, use_tqdm=False)]
    plain_steps = plain.engine.core.num_steps - plain_steps
    core = spec.engine.core
    before = core.num_draft_tokens, core.num_accepted_tokens, core.num_steps
    got = [o.outputs[0] for o in spec.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    drafted, accepted = core.num_draft_tokens - before[0], core.num_accepted_tokens - before[1]
    if "draft_model" in request.node.name:
        # The draft decodes without the grammar, so its proposals rarely fit it: correctness only.
        return
    assert drafted > 0 and accepted > 0  # proposals were checked by the grammar, and kept
    # Every kept proposal saved a forward.
    assert core.num_steps - before[2] < plain_steps
