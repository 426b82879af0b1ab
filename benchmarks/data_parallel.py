"""Data parallelism: W1-shaped offline throughput (N prompts of 128 tokens, 128 greedy tokens each,
all submitted at once through AsyncEngine) with one engine against `data_parallel_size` replicas,
every engine's model in worker processes (mp), alternating rounds in one run; the same tokens are
checked. On a host of C cores each of the D replicas computes with C / D threads.

    python benchmarks/data_parallel.py [--dtype float32] [--dp 2] [--rounds 3]
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
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    add_variant_args(parser)
    parser.add_argument("--output", default="data_parallel")
    args = parser.parse_args(argv)
    from asyncllm import AsyncEngine

    sizes = (1, args.dp)
    throughput: dict[int, list[float]] = {d: [] for d in sizes}
    ttft: dict[int, list[float]] = {d: [] for d in sizes}
    tokens: dict[int, list[list[int]]] = {}
    for _ in range(args.rounds):
        for dp in sizes:
            engine = AsyncEngine.from_args(data_parallel_size=dp, distributed_executor_backend="mp",
                                           **engine_variant(args))
            try:
                prompts = pydoc_prompts(engine.tokenizer, args.num_prompts, args.input_len)
                asyncio.run(run_all(engine, prompts[:2], 8))  # warm-up: kernels, pages
                tps, first, out = asyncio.run(run_all(engine, prompts, args.output_len))
            finally:
                engine.shutdown()
            throughput[dp].append(tps)
            ttft[dp].append(first)
            tokens[dp] = out
    same = sum(a == b for a, b in zip(tokens[1], tokens[args.dp]))
    rows = [{"replicas": dp, "output tok/s": statistics.median(throughput[dp]),
             "TTFT p50 (s)": statistics.median(ttft[dp]),
             "vs 1": statistics.median(throughput[dp]) / statistics.median(throughput[1])} for dp in sizes]
    publish(f"data parallel, {args.num_prompts} x ({args.input_len} in, {args.output_len} out) "
            f"({variant_name(args)}, median of {args.rounds} rounds; {same}/{len(tokens[1])} outputs equal)",
            rows, args.output, {"args": vars(args), "rows": rows, "throughput": throughput, "ttft": ttft,
                                "equal_outputs": same})
    return {"rows": rows}


if __name__ == "__main__":
    main()
