"""The whole-decoder C call for decode steps (model/cpu_decode.py; any number of sequences on panel
copies, 1-8 with blocks): the same bits
as the per-op C path at every row count, equal to transformers through the engine, and only taken
by the steps it is built for."""
import pytest
import torch

import helpers
from asyncllm import LLM, SamplingParams
from asyncllm.model.cpu_decode import MAX_ROWS, CpuDecodeStack

pytestmark = pytest.mark.timeout(600)

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


class StepRecorder:
    """Wraps a model's forward: records the steps it runs and which path ran each."""

    def __init__(self, model):
        self.model, self.steps, self.stack_calls = model, [], 0
        self._forward, self._stack_forward = model.forward, None
        model.forward = self._record

    def _record(self, input_ids, positions, kv_caches, meta):
        stack = self.model.decode_stack
        if stack is not None and self._stack_forward is None:
            self._stack_forward = stack.forward
            stack.forward = self._count_stack
        self.steps.append((input_ids.clone(), positions.clone(), kv_caches, meta))
        return self._forward(input_ids, positions, kv_caches, meta)

    def _count_stack(self, *args):
        self.stack_calls += 1
        return self._stack_forward(*args)


def _generate(llm, num_prompts: int, max_tokens: int = 12):
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(helpers.TEXT_PROMPTS[i % len(helpers.TEXT_PROMPTS)])[:20 + i]}
               for i in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return llm.generate(prompts, params, use_tqdm=False)


def _decode_steps(recorder, rows: int):
    return [s for s in recorder.steps if s[3].num_decodes == s[3].num_requests == s[0].shape[0] == rows]


@pytest.mark.parametrize("dtype, quantization", [
    ("float32", None), ("float32", "int4"), ("float32", "int8"), ("float32", "fp8"),
    pytest.param("bfloat16", None, marks=helpers.needs_bf16_c_kernels)])
@pytest.mark.parametrize("arch", ARCHS)
def test_stack_equals_the_per_op_path(arch, dtype, quantization, tiny_models):
    """Recorded decode steps rerun through both paths (each writes the same K/V into the same
    slots): bit for bit at every row count, dense (the fp32 or bf16 panel copies) or with 4- or
    8-bit blocks (both paths call the same matmul kernels)."""
    llm = LLM(tiny_models(arch), dtype=dtype, kernels="cpu", kv_cache_memory=16 << 20, quantization=quantization)
    model = llm.engine.core.executor.worker.runner.model
    # Dense projections have panel copies, read from PANEL_MIN_ROWS rows by both paths.
    assert all(p.prepacked.panels is not None for p in model.projections())
    # Past MAX_ROWS rows the stack takes a step only where every projection has its panel copy.
    row_counts = (1, 3, 8, 13) if CpuDecodeStack(model).max_rows is None else (1, 3, 8)
    recorder = StepRecorder(model)
    for rows in row_counts:
        _generate(llm, rows)
    model.forward = recorder._forward
    assert recorder.stack_calls > 0
    for rows in row_counts:
        steps = _decode_steps(recorder, rows)
        assert steps, rows
        input_ids, positions, kv_caches, meta = steps[-1]
        with torch.inference_mode():
            model.use_decode_stack = False
            per_op = model(input_ids, positions, kv_caches, meta)
            model.use_decode_stack = True
            stacked = model(input_ids, positions, kv_caches, meta)
        assert torch.equal(stacked, per_op), (stacked - per_op).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_on_the_stack_matches_transformers(arch, tiny_models):
    """Prompt chunks sharing steps with decodes, a prefix-cache hit, Mistral's window exceeded:
    the decode-only steps of up to 4 sequences run on the stack, and the ids equal transformers'."""
    path = tiny_models(arch)
    llm = LLM(path, dtype="float32", kernels="cpu", kv_cache_memory=16 << 20, max_num_batched_tokens=20)
    recorder = StepRecorder(llm.engine.core.executor.worker.runner.model)
    helpers.check_mixed_steps_match_transformers(llm, helpers.load_hf(path))
    decode_only = [s for s in recorder.steps if s[3].num_decodes == s[3].num_requests == s[0].shape[0]]
    assert recorder.stack_calls == len(decode_only) > 0


@pytest.mark.parametrize("quantization, big_steps_on_stack", [(None, True), ("int4", False)])
def test_stack_takes_only_the_steps_it_is_built_for(quantization, big_steps_on_stack, tiny_models):
    """Decode-only steps: any size on panel copies; with blocks (read at 1-8 rows), 1-8 rows only."""
    path = tiny_models("LlamaForCausalLM")
    llm = LLM(path, dtype="float32", kernels="cpu", kv_cache_memory=16 << 20, max_num_seqs=12,
              quantization=quantization)
    model = llm.engine.core.executor.worker.runner.model
    recorder = StepRecorder(model)
    _generate(llm, MAX_ROWS + 3)  # decode steps of 11 rows
    _generate(llm, 2)  # decode steps of 2 rows: the stack
    decodes = [s for s in recorder.steps if s[3].num_decodes == s[3].num_requests == s[0].shape[0]]
    assert {s[0].shape[0] for s in decodes} == {MAX_ROWS + 3, 2}
    assert len(recorder.steps) > len(decodes)  # the prompt steps
    on_stack = [s for s in decodes if big_steps_on_stack or s[0].shape[0] == 2]
    assert recorder.stack_calls == len(on_stack)


def test_stack_is_off_where_the_weights_do_not_fit_it(tiny_models):
    path = tiny_models("LlamaForCausalLM")
    for kwargs in ({"kernels": "torch"}, {"dtype": "bfloat16", "cpu_weight_prepack": False},
                   {"kernels": "torch", "quantization": "int4"},
                   {"dtype": "bfloat16", "quantization": "int4"}, {"dtype": "bfloat16", "quantization": "int8"}):
        other = LLM(path, **{"dtype": "float32", "kv_cache_memory": 16 << 20, **kwargs})
        other_model = other.engine.core.executor.worker.runner.model
        _generate(other, 2, max_tokens=3)
        assert other_model.decode_stack is None or not other_model.decode_stack.enabled, kwargs


@pytest.mark.parametrize("quantization", ["int4", "int8", "fp8"])
def test_stack_reads_the_blocks_and_the_8bit_logits(quantization, tiny_models):
    """quantization="int4", "int8" or "fp8" with the C kernels: the stack is on, reads every projection's blocks,
    and the step's logits come from the 8-bit copy; a 1-row step's hidden state and logits equal,
    to fp32 rounding, what the per-op path gives with the blocks' weights put back as dense ones."""
    llm = LLM(tiny_models("Qwen3ForCausalLM"), dtype="float32", kernels="cpu", kv_cache_memory=16 << 20,
              quantization=quantization)
    model = llm.engine.core.executor.worker.runner.model
    recorder = StepRecorder(model)
    _generate(llm, 1, max_tokens=4)
    model.forward = recorder._forward
    assert recorder.stack_calls > 0 and model.decode_stack.enabled and model.logits_quant is not None
    input_ids, positions, kv_caches, meta = _decode_steps(recorder, 1)[-1]
    with torch.inference_mode():
        logits = model.compute_logits(model(input_ids, positions, kv_caches, meta))
        torch.testing.assert_close(logits, model.compute_logits(model(input_ids, positions, kv_caches, meta)),
                                   rtol=0, atol=0)
        dense_logits = model.logits_linear.linear(model(input_ids, positions, kv_caches, meta), model.logits_weight)
        for projection in model.projections():  # swap the blocks' weights in, densely
            projection.weight.copy_(projection.quantized.dequantize())
            projection.quantized, projection.quantized_max_rows = None, 0
            projection.pack()  # the panel copy, which steps of any row count read, of the new weight
        model.use_decode_stack = False
        hidden = model(input_ids, positions, kv_caches, meta)
        expected_dense = model.logits_linear.linear(hidden, model.logits_weight)
        expected = model.logits_quant.linear(hidden)
    torch.testing.assert_close(dense_logits, expected_dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(logits, dense_logits)  # the 8-bit copy is really what ran
