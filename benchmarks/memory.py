"""Memory a model takes: the RSS its weights add at load, the load's peak, and the whole process.

Each variant loads in a fresh process, in stages:

  runtime   RSS after `import asyncllm, torch`, the libraries that opening a checkpoint imports
            (transformers' config, the GGUF tokenizer's conversion; measured by opening the same
            checkpoint once and dropping it first) and torch's thread pool: the process any model
            of this engine needs
  weights   RSS added by `LLM(model)` with a small KV cache, minus the KV cache's resident pages:
            the model's own memory (issue 33's measure, against the GGUF file's size)
  peak      the highest RSS during that load (ru_maxrss) above `runtime`
  process   the whole process's RSS after a short batch (8 x 128-token prompts, 32 tokens each),
            the figure to put beside llama.cpp's server RSS (llamacpp_compare.py)

The KV cache is reported apart: its reserved bytes and how much of it is resident.

    python benchmarks/memory.py [--model gemma3-270m] [--variants auto,float32,int4-only]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import machine, print_table, resolve_model, save  # noqa: E402

# name → LLM keyword arguments
VARIANTS = {
    "auto": {},
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int4-only": {"dtype": "float32", "quantization": "int4", "quantized_weights_only": True},
    "int8-only": {"dtype": "float32", "quantization": "int8", "quantized_weights_only": True},
}
KV_CACHE_BYTES = 64 << 20


def measure(model: str | None, engine_args: dict, prompts: int, prompt_tokens: int, max_tokens: int) -> dict:
    """In this process (a fresh one: memory.py runs each variant apart)."""
    import gc

    import torch

    from asyncllm import LLM, SamplingParams
    from asyncllm.model.loader import load_checkpoint
    from asyncllm.worker.cpu_allocator import return_freed_memory
    from common import pydoc_prompts, rss_mb

    def peak_mb() -> float:  # VmHWM: the highest RSS since the last reset_peak()
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

    def reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    checkpoint = load_checkpoint(model)  # imports what opening a checkpoint needs; dropped again
    del checkpoint
    torch.ones(512, 512) @ torch.ones(512, 512)  # the thread pool's stacks (~9 MB on 2 cores): runtime too
    gc.collect()
    return_freed_memory()
    runtime = rss_mb()
    reset_peak()
    llm = LLM(model, kv_cache_memory=KV_CACHE_BYTES, **engine_args)
    gc.collect()
    loaded = rss_mb()
    peak = peak_mb()
    runner = llm.engine.core.executor.worker.runner
    kv_reserved = sum(c.numel() * c.element_size() for c in runner.kv_caches) / 2 ** 20
    kv_resident = _resident_mb(runner.kv_caches)
    tok = llm.get_tokenizer()
    batch = [{"prompt_token_ids": p} for p in pydoc_prompts(tok, prompts, prompt_tokens)]
    llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    process = rss_mb()
    dtype = str(llm.engine.core.dtype).removeprefix("torch.")
    llm.engine.shutdown()
    return {"runtime_mb": runtime, "weights_mb": loaded - runtime - kv_resident,
            "peak_added_mb": peak - runtime,
            "process_mb": process, "kv_reserved_mb": kv_reserved, "kv_resident_after_load_mb": kv_resident,
            "dtype": dtype}


def _resident_mb(tensors) -> float:
    """Resident pages of these CPU tensors' memory (mincore on their ranges), MiB."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    total = 0
    for tensor in tensors:
        start = tensor.data_ptr() - tensor.data_ptr() % page
        end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
        pages = -(-(end - start) // page)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
            return float("nan")
        total += sum(b & 1 for b in vec) * page
    return total / 2 ** 20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a GGUF / HF folder path or gemma3-270m (default: the default model)")
    parser.add_argument("--variants", default="auto,float32,int4-only")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--output", default="memory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    if args.child is not None:
        print(json.dumps(measure(model, VARIANTS[args.child], args.prompts, args.prompt_tokens, args.max_tokens)))
        return {}
    from asyncllm.model.default_model import default_model_path

    path = model or default_model_path()
    file_mb = (os.path.getsize(path) if os.path.isfile(path) else
               sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
               ) / 2 ** 20
    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        command = [sys.executable, __file__, "--child", name, "--prompts", str(args.prompts),
                   "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens)]
        if args.model:
            command += ["--model", args.model]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"variant {name} failed:\n{done.stderr[-3000:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"variant": name, "dtype": got["dtype"], "weights_mb": round(got["weights_mb"]),
                     "weights_per_file": round(got["weights_mb"] / file_mb, 2),
                     "load_peak_added_mb": round(got["peak_added_mb"]), "runtime_mb": round(got["runtime_mb"]),
                     "process_mb_after_batch": round(got["process_mb"]), "kv_reserved_mb": round(got["kv_reserved_mb"]),
                     "kv_resident_after_load_mb": round(got["kv_resident_after_load_mb"])})
    print_table(f"memory of {os.path.basename(path)} ({file_mb:.0f} MiB file); weights = RSS the load adds, "
                "KV cache apart", rows)
    result = {"model": path, "file_mb": file_mb, "rows": rows, "machine": machine(),
              "kv_cache_memory_mb": KV_CACHE_BYTES >> 20}
    print(f"wrote {save(args.output, result)}")
    return result


if __name__ == "__main__":
    main()
