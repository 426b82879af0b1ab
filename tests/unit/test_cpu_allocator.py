"""The glibc malloc tuning (EngineArgs.cpu_malloc_tuning): with it, a prompt batch no longer
page-faults its activation buffers in again at every step. Counted with the process's minor
page faults over a batch of 8 x 128-token prompts on the default model, tuned and untuned, each
in a fresh process (the setting is process-wide)."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

SCRIPT = """
import resource, sys
from asyncllm import LLM, SamplingParams
llm = LLM(dtype="float32", max_num_batched_tokens=1024, cpu_malloc_tuning=sys.argv[1] == "on")
params = SamplingParams(max_tokens=1)
for wave in range(2):  # the first wave also faults in the KV cache and warms up
    prompts = [{"prompt_token_ids": [1000 + 8 * wave + i + j for j in range(128)]} for i in range(8)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    llm.generate(prompts, params, use_tqdm=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(setting: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True, timeout=250)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_malloc_tuning_stops_refaulting_activations():
    untuned, tuned = _page_faults("off"), _page_faults("on")
    # Measured here: ~195,000 faults untuned, ~11,500 tuned (those left are new KV cache pages).
    assert tuned * 5 < untuned, (tuned, untuned)


def test_malloc_tuning_is_on_by_default_with_a_switch():
    from asyncllm.config import EngineArgs
    from asyncllm.worker.cpu_allocator import keep_freed_memory_in_heap

    assert EngineArgs().cpu_malloc_tuning is True
    assert keep_freed_memory_in_heap() is True  # glibc here; False elsewhere, never an error
    help_text = subprocess.run([sys.executable, "-m", "asyncllm.cli", "serve", "--help"],
                               capture_output=True, text=True).stdout
    assert "--no-cpu-malloc-tuning" in help_text
