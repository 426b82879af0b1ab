"""CPU fast paths change speed, never tokens: each one on vs off on the default model (fp32)."""
import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.model.layers.linear import Linear, prepack_supported


@pytest.mark.parametrize("dtype,tolerance,packed_from_rows", [(torch.float32, 1e-5, 2), (torch.bfloat16, 2e-2, 1)])
def test_packed_linear_matches_plain_for_every_row_count(dtype, tolerance, packed_from_rows):
    """fp32 keeps gemv for one row; bf16 reads the packed weight from one row on (faster there)."""
    if not prepack_supported(torch.device("cpu"), dtype):  # the engine then packs nothing (tested below)
        pytest.skip(f"oneDNN cannot pack {dtype} here (torch without oneDNN, or bf16 on an AVX2-only CPU)")
    torch.manual_seed(0)
    layer = Linear(96, 160, bias=True).to(dtype)
    inputs = {rows: torch.randn(rows, 96, dtype=dtype) for rows in (1, 2, 7, 64, 300)}
    plain = {rows: layer(x) for rows, x in inputs.items()}
    layer.pack()
    assert layer.prepacked.packed is not None and layer.prepacked.min_rows == packed_from_rows
    for rows, x in inputs.items():
        torch.testing.assert_close(layer(x), plain[rows], atol=tolerance, rtol=tolerance)


def test_weight_prepack_and_batched_decode_keep_tokens(default_llm):
    """Packed weights (batched rows) and the batched decode attention give the tokens of plain
    weights, and of each prompt run alone (1 row: gemv and the same decode path at batch 1)."""
    tok = default_llm.get_tokenizer()
    prompts = [tok.encode(t) for t in ("The history of Rome", "def quicksort(xs):", "Water is made of",
                                       "My favourite recipe", "The tallest mountain", "import json\n")]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    packed = default_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert any(m.prepacked.is_packed for m in default_llm.engine.core.executor.worker.runner.model.modules()
               if isinstance(m, Linear)) == prepack_supported(torch.device("cpu"), torch.float32)
    plain_llm = LLM(dtype="float32", cpu_weight_prepack=False, kv_cache_memory=64 << 20)
    assert all(not m.prepacked.is_packed for m in plain_llm.engine.core.executor.worker.runner.model.modules()
               if isinstance(m, Linear))
    plain = plain_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    alone = [plain_llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts[:2]]
    assert [o.outputs[0].token_ids for o in packed] == [o.outputs[0].token_ids for o in plain]
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in packed[:2]]


def test_model_load_thread_returns_result_raises_errors_and_leaves_no_threads():
    """The model-load thread runs the work off the caller's thread, hands back its result or error,
    and is gone afterwards (and with it the OpenMP pool its torch work created)."""
    import os
    import threading
    import time

    from asyncllm.threads import in_passing_thread

    main = threading.get_ident()

    def build():
        return threading.get_native_id(), threading.get_ident(), torch.ones(1 << 20).add(1).sum().item()

    native_id, ident, total = in_passing_thread(build)
    assert ident != main and total == 2.0 * (1 << 20)
    deadline = time.monotonic() + 5  # join() returns before the OS thread has quite finished exiting
    while str(native_id) in os.listdir("/proc/self/task") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert str(native_id) not in os.listdir("/proc/self/task")  # the load thread is gone
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)
