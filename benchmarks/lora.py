"""Multi-LoRA: decode tok/s of the default model with adapters against the base model on the same
engine, at batch 8 (4 different rank-16 adapters, two requests each) and single stream (one
adapter), greedy; and the time to load a rank-16 adapter over all seven projections.

Decode tok/s = rows x (max_tokens - 1) / the batch's decode window (from every request's first
token to the last token, by the requests' own timestamps), so the prompt's prefill is left out. The adapters are PEFT folders of random weights (write_random_adapter).

    python benchmarks/lora.py [--batch 8] [--max-tokens 128] [--dtypes float32,auto] [--repeats 3]

Each case runs `--repeats` times, the cases taking turns (so a slow spell of a shared machine
falls on all of them), and the median counts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import Timer, publish, pydoc_prompts  # noqa: E402


def decode_tok_per_s(llm, prompts, loras, max_tokens: int) -> float:
    """Tokens after the first over the batch's decode window: from the moment every request has its
    first token to the last token (the requests' own timestamps, so no prompt time is in it; a
    difference of two whole runs' times could go negative on a few tokens)."""
    from asyncllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    window = max(o.metrics.last_token_time for o in outs) - max(o.metrics.first_token_time for o in outs)
    return len(prompts) * (max_tokens - 1) / window


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from asyncllm import LLM, LoRARequest
    from asyncllm.lora.adapter import load_adapter, write_random_adapter

    rows, loads = [], []
    with tempfile.TemporaryDirectory() as root:
        for dtype in args.dtypes.split(","):
            llm = LLM(dtype=dtype, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank,
                      max_num_seqs=max(args.batch, 1))
            cfg = llm.engine.core.executor.worker.model.config
            loras = []
            for j in range(args.adapters):
                folder = os.path.join(root, f"adapter{j}")
                if not os.path.isdir(folder):
                    write_random_adapter(folder, cfg, args.rank, seed=j)
                loras.append(LoRARequest(f"adapter{j}", j + 1, folder))
            prompts = pydoc_prompts(llm.get_tokenizer(), args.batch, args.input_len)
            llm.generate([{"prompt_token_ids": prompts[0]}], use_tqdm=False, lora_request=loras[0])  # warm up
            resolved = str(llm.engine.core.dtype)
            cases = {
                f"batch {args.batch}, base": (prompts, [None] * args.batch),
                f"batch {args.batch}, {args.adapters} adapters": (prompts, [loras[i % args.adapters]
                                                                           for i in range(args.batch)]),
                "single stream, base": (prompts[:1], [None]),
                "single stream, 1 adapter": (prompts[:1], [loras[0]]),
            }
            runs: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.repeats):
                for name, (batch_prompts, batch_loras) in cases.items():
                    runs[name].append(decode_tok_per_s(llm, batch_prompts, batch_loras, args.max_tokens))
            speeds = {name: statistics.median(values) for name, values in runs.items()}
            for name, speed in speeds.items():
                base = speeds[name.split(",")[0] + ", base"]
                rows.append({"dtype": resolved, "case": name, "decode_tok_per_s": speed, "vs_base": speed / base})
            runner_dtype = llm.engine.core.executor.worker.runner.lora.dtype
            for j in range(5):  # from the page cache, as a server reloading an evicted adapter does
                with Timer() as t:
                    load_adapter(loras[j % args.adapters].lora_path, 99, cfg, args.rank, runner_dtype)
                loads.append(t.seconds * 1e3)
            llm.engine.shutdown()
    load_ms = statistics.median(loads)
    rows.append({"dtype": "-", "case": f"load rank-{args.rank} adapter (median ms)", "decode_tok_per_s": load_ms,
                 "vs_base": 0.0})
    publish(f"Multi-LoRA decode, default model, {args.input_len}-token prompts, {args.max_tokens} tokens", rows,
            "lora", {"rows": rows, "load_ms": loads, "args": vars(args)})
    return {"rows": rows, "load_ms": load_ms}


if __name__ == "__main__":
    main()
