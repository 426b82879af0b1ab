"""Beam search against transformers' `generate(num_beams=...)` on the same weights: the same
sequences in the same order and the same scores (within 1e-3), with and without EOS endings,
length penalties, ignore_eos; the AsyncEngine and the server's `use_beam_search` agree."""
import anyio
import openai
import pytest
import torch

import helpers
from asyncllm import LLM, AsyncEngine, BeamSearchParams, InvalidRequestError
from asyncllm.server import build_app
from server_helpers import RunningServer


def hf_beams(model, prompt_ids: list[int], width: int, max_tokens: int, eos: list[int], length_penalty: float = 1.0,
             ignore_eos: bool = False) -> tuple[list[list[int]], list[float]]:
    """transformers' beams: the generated tokens of each returned sequence (padding cut) and its score."""
    out = model.generate(torch.tensor([prompt_ids]), num_beams=width, num_return_sequences=width,
                         max_new_tokens=max_tokens, do_sample=False, length_penalty=length_penalty,
                         early_stopping=False, eos_token_id=None if ignore_eos else eos, pad_token_id=eos[0],
                         return_dict_in_generate=True, output_scores=True)
    sequences = []
    for row in out.sequences[:, len(prompt_ids):].tolist():
        if not ignore_eos and any(t in eos for t in row):  # cut after the first EOS (the rest is padding)
            row = row[:next(i for i, t in enumerate(row) if t in eos) + 1]
        sequences.append(row)
    return sequences, out.sequences_scores.tolist()


def assert_same_beams(ours, theirs) -> None:
    sequences, scores = theirs
    assert [s.output_token_ids for s in ours.sequences] == sequences
    assert [s.score for s in ours.sequences] == pytest.approx(scores, abs=1e-3)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    path = tiny_models("LlamaForCausalLM")
    return path, helpers.load_hf(path)


@pytest.mark.parametrize("length_penalty,ignore_eos", [(1.0, False), (0.5, False), (2.0, True)])
def test_tiny_model_beams_equal_transformers(tiny, length_penalty, ignore_eos):
    path, hf = tiny
    llm = LLM(path, dtype="float32", kv_cache_memory=32 << 20)
    try:
        prompts = [[1, 520, 2914, 331, 1097], [1, 33, 7, 900]]
        eos = list(llm.engine.eos_token_ids)
        params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=length_penalty, ignore_eos=ignore_eos)
        ours = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        llm.engine.shutdown()
    for prompt, result in zip(prompts, ours):
        assert_same_beams(result, hf_beams(hf, prompt, 4, 10, eos, length_penalty, ignore_eos))


def test_default_model_beams_equal_transformers_with_eos_endings(default_llm, default_gguf):
    hf = helpers.load_hf(None, gguf_file=default_gguf)
    engine = default_llm.engine
    eos = list(engine.eos_token_ids)
    prompts = [engine.input_processor.process_prompt([{"role": "user", "content": q}]).prompt_token_ids
               for q in ("What is 2 + 2? Answer with a number.", "Say yes.")]
    results = default_llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                                      BeamSearchParams(beam_width=4, max_tokens=24))
    assert any(s.finish_reason == "stop" for r in results for s in r.sequences)  # beams that ended with EOS
    for prompt, result in zip(prompts, results):
        assert_same_beams(result, hf_beams(hf, prompt, 4, 24, eos))
        assert result.sequences[0].text and "<|im_end|>" not in result.sequences[0].text


def test_async_engine_and_server_use_beam_search_agree(default_llm):
    params = BeamSearchParams(beam_width=3, max_tokens=12)
    offline = default_llm.beam_search("The capital of France is", params)[0]
    engine = AsyncEngine.from_args(dtype="float32")
    server = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        online = anyio.run(lambda: engine.beam_search("The capital of France is", params))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        r = client.completions.create(model=engine.model_name, prompt="The capital of France is", max_tokens=12,
                                      n=2, temperature=0, extra_body={"use_beam_search": True, "best_of": 3})
    finally:
        server.stop()
        engine.shutdown()
    assert [s.output_token_ids for s in online.sequences] == [s.output_token_ids for s in offline.sequences]
    assert [c.text for c in r.choices] == [s.text for s in offline.sequences[:2]]
    assert r.usage.completion_tokens == sum(len(s.output_token_ids) for s in offline.sequences[:2])


def test_what_beam_search_refuses(default_llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)
    with pytest.raises(InvalidRequestError, match="max_logprobs"):
        default_llm.beam_search("Hi", BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        default_llm.beam_search("Hi", BeamSearchParams(beam_width=2, max_tokens=10**6))
