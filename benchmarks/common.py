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

    texts = [t for t in topics.topics.values() if len(t) > 4 * tokens]
    prompts = []
    for i in range(n):
        ids = tokenizer.encode(texts[i % len(texts)], add_special_tokens=False)
        prompts.append(ids[:tokens])
    return prompts


def machine() -> dict:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "avx512": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


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
