"""KV cache prefault (EngineArgs.kv_cache_prefault): with it the cache's pages are mapped when it
is made (the process's resident memory grows by the cache's size at once), without it they are
mapped on first use; both read as zeros. On by default for `asyncllm serve` only: an app that
embeds the engine (or makes an `LLM`) keeps its memory lazy. What it buys is measured by benchmarks/ (docs/PERFORMANCE.md)."""
import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.cli import build_parser, engine_args_from
from asyncllm.config import EngineArgs
from asyncllm.worker import model_runner

pytestmark = pytest.mark.timeout(120)

SIZE = 64 << 20


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def _made_resident(prefault: bool) -> tuple[int, torch.Tensor]:
    before = _resident_bytes()
    cache = model_runner._zeros((2, SIZE // 8), torch.float32, torch.device("cpu"), prefault)
    return _resident_bytes() - before, cache


def test_prefault_maps_every_page_at_once():
    grown, cache = _made_resident(prefault=True)
    assert grown >= 0.95 * SIZE
    assert not cache.any()


def test_without_prefault_pages_are_mapped_on_first_use():
    before = _resident_bytes()
    grown, cache = _made_resident(prefault=False)
    assert grown < 0.1 * SIZE
    cache[0].fill_(1.0)  # half of it
    assert _resident_bytes() - before >= 0.45 * SIZE
    assert not cache[1].any()


def test_kernels_without_populate_fall_back_to_touching_each_page(monkeypatch):
    monkeypatch.setattr(model_runner, "_MADV_POPULATE_WRITE", -1)  # madvise refuses it: EINVAL
    grown, cache = _made_resident(prefault=True)
    assert grown >= 0.95 * SIZE
    assert not cache.any()


def test_defaults_per_entry_point(tiny_models):
    assert EngineArgs().kv_cache_prefault is False
    parser = build_parser()
    assert engine_args_from(parser.parse_args(["serve"])).kv_cache_prefault is True
    assert engine_args_from(parser.parse_args(["serve", "--no-kv-cache-prefault"])).kv_cache_prefault is False
    assert engine_args_from(parser.parse_args(["generate", "hi"])).kv_cache_prefault is False
    path = tiny_models("LlamaForCausalLM")
    lazy = LLM(path, kv_cache_memory=16 << 20)
    eager = LLM(path, kv_cache_memory=16 << 20, kv_cache_prefault=True)
    assert lazy.engine.core.config.args.kv_cache_prefault is False
    assert eager.engine.core.config.args.kv_cache_prefault is True
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outputs = [llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].token_ids
               for llm in (lazy, eager)]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 8
