"""What the mp executor costs: decode steps with the model in a worker process against in the
engine thread (uni), same prompts, greedy, alternating rounds in one run.

Per step = (end-to-end - time to first token) / (output tokens - 1) of a single stream, and of
W1-shaped batches (8 streams); the difference is the round trip (encode the step, a socket
write and read each way, decode the tokens) plus whatever the second process disturbs.

    python benchmarks/executor_overhead.py [--dtype float32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import add_variant_args, engine_variant, publish, pydoc_prompts, variant_name  # noqa: E402


def step_ms(llm, prompts, output_len: int) -> float:
    from asyncllm import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    per_step = [(o.metrics.finished_time - o.metrics.first_token_time) / (output_len - 1) * 1e3 for o in outs]
    return statistics.median(per_step)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    add_variant_args(parser)
    parser.add_argument("--output", default="executor_overhead")
    args = parser.parse_args(argv)
    from asyncllm import LLM

    results: dict[str, dict[str, list[float]]] = {b: {"1": [], str(args.batch): []} for b in ("uni", "mp")}
    for _ in range(args.rounds):
        for backend in ("uni", "mp"):
            llm = LLM(distributed_executor_backend=backend, **engine_variant(args))
            prompts = pydoc_prompts(llm.get_tokenizer(), args.batch, 128)
            prompts = [{"prompt_token_ids": p} for p in prompts]
            step_ms(llm, prompts[:1], 16)  # warm-up: kernels, pages
            results[backend]["1"].append(step_ms(llm, prompts[:1], args.output_len))
            results[backend][str(args.batch)].append(step_ms(llm, prompts, args.output_len))
            llm.engine.shutdown()
    rows = []
    for streams in ("1", str(args.batch)):
        uni = statistics.median(results["uni"][streams])
        mp = statistics.median(results["mp"][streams])
        rows.append({"streams": streams, "uni ms/step": uni, "mp ms/step": mp, "mp - uni (ms)": mp - uni})
    publish(f"executor overhead per decode step ({variant_name(args)}, median of {args.rounds} rounds)", rows,
            args.output, {"args": vars(args), "rows": rows, "raw": results})
    return {"rows": rows}


if __name__ == "__main__":
    main()
