"""The whole engine on the C kernels (kernels="cpu", what `auto` picks on the CPU) and on the plain
torch ops, against transformers: greedy ids equal, logprobs close, with prompt chunks sharing steps
with decodes, prefix-cache hits, Mistral's sliding window and Qwen3's q/k norms. Also how the
kernel choice resolves, and the errors when the C kernels cannot be built."""
import pytest

import helpers
from asyncllm import LLM
from asyncllm.config import EngineArgs
from asyncllm.kernels.cpu import library

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"])
def test_engine_kernels_match_transformers(arch, kernels, tiny_models):
    path = tiny_models(arch)
    hf = helpers.load_hf(path)
    # 20-token chunks: the 30-token prompts take two steps and share them with other requests' decodes.
    llm = LLM(path, dtype="float32", kernels=kernels, kv_cache_memory=16 << 20, max_num_batched_tokens=20)
    assert llm.engine.core.config.kernels == kernels
    prompts = helpers.check_mixed_steps_match_transformers(llm, hf)
    if arch == "MistralForCausalLM":
        assert max(len(p) for p in prompts) + 24 > llm.engine.core.checkpoint.config.sliding_window


def test_auto_picks_the_c_kernels_on_the_cpu():
    assert EngineArgs(device="cpu").create_engine_config().kernels == "cpu"


def test_kernels_that_cannot_build_fall_back_or_refuse(monkeypatch, caplog):
    monkeypatch.setattr(library, "build_error", lambda: "no C compiler found (gcc or $CC)")
    with caplog.at_level("WARNING"):
        assert EngineArgs(device="cpu").create_engine_config().kernels == "torch"
    assert "no C compiler found" in caplog.text
    with pytest.raises(ValueError, match="kernels='cpu': no C compiler found"):
        EngineArgs(device="cpu", kernels="cpu").create_engine_config()


def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCLLM_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: something is wrong' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(library.KernelBuildError, match="something is wrong"):
        library._build(str(broken))
    assert not list((tmp_path / "cpu_kernels").glob("*.so*"))  # no half-written library left behind
