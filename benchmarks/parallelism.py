"""Data or pipeline parallelism against one engine: W1-shaped offline throughput (N prompts of 128
tokens, 128 greedy tokens each, all submitted at once through AsyncEngine) and a single stream,
with `--split data` (D replicas; on a host of C cores each computes with C / D threads) or
`--split pipeline` (the layers over S stage processes, one batch in flight); every engine's model
in worker processes (mp), alternating rounds in one run; the same tokens are checked.

    python benchmarks/parallelism.py [--split data|pipeline] [--size 2] [--dtype float32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import add_variant_args, engine_variant, publish, pydoc_prompts, variant_name  # noqa: E402


async def run_all(engine, prompts: list[list[int]], output_len: int) -> tuple[float, float, list[list[int]]]:
    """→ (output tokens/s, median TTFT in s, each request's tokens)."""
    started = time.perf_counter()
    outs = await asyncio.gather(*(engine.complete({"prompt_token_ids": p}, max_tokens=output_len, temperature=0,
                                                  ignore_eos=True) for p in prompts))
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = statistics.median(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)
    return tokens / seconds, ttft, [list(o.outputs[0].token_ids) for o in outs]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", choices=["data", "pipeline"], default="data")
    parser.add_argument("--size", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    add_variant_args(parser)
    parser.add_argument("--output", default=None, help="default: data_parallel / pipeline_parallel")
    args = parser.parse_args(argv)
    option = f"{args.split}_parallel_size"
    args.output = args.output or f"{args.split}_parallel"
    from asyncllm import AsyncEngine

    sizes = (1, args.size)
    throughput: dict[int, list[float]] = {d: [] for d in sizes}
    single: dict[int, list[float]] = {d: [] for d in sizes}
    ttft: dict[int, list[float]] = {d: [] for d in sizes}
    tokens: dict[int, list[list[int]]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            engine = AsyncEngine.from_args(distributed_executor_backend="mp", **{option: size},
                                           **engine_variant(args))
            try:
                prompts = pydoc_prompts(engine.tokenizer, args.num_prompts, args.input_len)
                asyncio.run(run_all(engine, prompts[:2], 8))  # warm-up: kernels, pages
                single[size].append(asyncio.run(run_all(engine, prompts[:1], args.output_len))[0])
                tps, first, out = asyncio.run(run_all(engine, prompts, args.output_len))
            finally:
                engine.shutdown()
            throughput[size].append(tps)
            ttft[size].append(first)
            tokens[size] = out
    same = sum(a == b for a, b in zip(tokens[1], tokens[args.size]))
    rows = [{option: size, "output tok/s": statistics.median(throughput[size]),
             "TTFT p50 (s)": statistics.median(ttft[size]),
             "vs 1": statistics.median(throughput[size]) / statistics.median(throughput[1]),
             "single stream tok/s": statistics.median(single[size])} for size in sizes]
    publish(f"{args.split} parallel, {args.num_prompts} x ({args.input_len} in, {args.output_len} out) "
            f"({variant_name(args)}, median of {args.rounds} rounds; {same}/{len(tokens[1])} outputs equal)",
            rows, args.output, {"args": vars(args), "rows": rows, "throughput": throughput, "single": single,
                                "ttft": ttft, "equal_outputs": same})
    return {"rows": rows}


if __name__ == "__main__":
    main()
