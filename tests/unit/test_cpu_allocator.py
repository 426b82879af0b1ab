"""The glibc malloc tuning (EngineArgs.cpu_malloc_tuning): after keep_freed_memory_in_heap(), an
activation-sized buffer (16 MB) comes from the heap instead of a fresh mmap, and freeing it keeps
the memory in the heap, so the next step does not page-fault it in again. Read from glibc's own
accounting (mallinfo2), in a fresh process that loads only that module (anything allocating and
freeing big buffers first would move glibc's dynamic thresholds). The speed-up it buys is
measured by benchmarks/ (docs/PERFORMANCE.md)."""
import subprocess
import sys
from pathlib import Path

import pytest

import asyncllm.worker.cpu_allocator as cpu_allocator
from asyncllm import LLM

pytestmark = pytest.mark.timeout(300)

SCRIPT = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("cpu_allocator", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "on":
    assert module.keep_freed_memory_in_heap()
before = libc.mallinfo2().hblkhd
buffer = libc.malloc(16 << 20)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(buffer)
print(mmapped, libc.mallinfo2().fordblks)
"""


def _after_a_16mb_buffer(setting: str) -> tuple[int, int]:
    """→ (bytes it took in mmapped chunks, free bytes the heap holds after it was freed)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, setting, str(Path(cpu_allocator.__file__))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    mmapped, kept = done.stdout.split()
    return int(mmapped), int(kept)


def test_buffers_come_from_the_heap_and_stay_there():
    mmapped, _ = _after_a_16mb_buffer("off")
    assert mmapped >= 16 << 20  # glibc's default: a fresh mmap, unmapped again on free
    mmapped, kept = _after_a_16mb_buffer("on")
    assert mmapped == 0 and kept >= 16 << 20


@pytest.mark.parametrize("enabled", [True, False])
def test_the_engine_applies_it_when_asked(enabled, tiny_models, monkeypatch):
    calls = []
    monkeypatch.setattr("asyncllm.worker.worker.keep_freed_memory_in_heap", lambda: calls.append(1) or True)
    LLM(tiny_models("LlamaForCausalLM"), dtype="float32", kv_cache_memory=4 << 20, cpu_malloc_tuning=enabled)
    assert calls == ([1] if enabled else [])


def test_malloc_tuning_is_on_by_default_with_a_switch():
    from asyncllm.config import EngineArgs

    assert EngineArgs().cpu_malloc_tuning is True
    assert cpu_allocator.keep_freed_memory_in_heap() is True  # glibc here; False elsewhere, never an error
    help_text = subprocess.run([sys.executable, "-m", "asyncllm.cli", "serve", "--help"],
                               capture_output=True, text=True).stdout
    assert "--no-cpu-malloc-tuning" in help_text


TRIM_SCRIPT = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("cpu_allocator", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
assert module.keep_freed_memory_in_heap()  # as the engine runs: freed memory stays in the heap
middle, top = libc.malloc((32 << 20) - 4096), libc.malloc(1 << 20)
libc.memset(middle, 1, (32 << 20) - 4096)  # resident
libc.memset(top, 1, 1 << 20)
libc.free(middle)  # below `top`: the heap cannot shrink past it
kept = resident()
assert module.return_freed_memory()
print(kept - resident())
"""


def test_return_freed_memory_hands_a_freed_chunk_inside_the_heap_back():
    """What quantized_weights_only calls after freeing the dense weights: without it a freed chunk
    below a live one stays resident (the heap only shrinks from its top)."""
    done = subprocess.run([sys.executable, "-c", TRIM_SCRIPT, str(Path(cpu_allocator.__file__))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) >= 24 << 20  # most of the 32 MB chunk went back to the OS
