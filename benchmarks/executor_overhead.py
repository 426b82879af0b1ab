"""What the mp executor costs: decode steps with the model in a worker process against in the
engine thread (uni), same prompts, greedy, alternating rounds in one run.

Per step = (end-to-end - time to first token) / (output tokens - 1) of a single stream, and of
W1-shaped batches (8 streams); the difference is the round trip (encode the step, a socket
write and read each way, decode the tokens) plus whatever the second process disturbs, and
on a small machine it moves by a millisecond between runs with the forward's own time. So the
channel is also measured directly: each mp step's round trip in the engine minus the time the
worker reports it spent on the step (`ModelRunnerOutput.worker_seconds`), median over steps.

    python benchmarks/executor_overhead.py [--dtype float32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import add_variant_args, engine_variant, publish, pydoc_prompts, variant_name  # noqa: E402


def step_ms(llm, prompts, output_len: int) -> float:
    from asyncllm import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    per_step = [(o.metrics.finished_time - o.metrics.first_token_time) / (output_len - 1) * 1e3 for o in outs]
    return statistics.median(per_step)


class ChannelTimer:
    """Wraps an executor's execute: per decode step, round trip minus the worker's own time."""

    def __init__(self, executor, batch: int):
        from asyncllm.executor.abstract import PendingStep

        self.samples: list[float] = []
        start = executor.execute_async  # the engine starts each step here and waits on its result

        def execute_async(sched):
            started = time.perf_counter()
            pending = start(sched)

            def wait():
                output = pending.result()
                if len(sched.scheduled) == batch and sched.num_batched_tokens == batch:
                    self.samples.append((time.perf_counter() - started - output.worker_seconds) * 1e3)
                return output

            return PendingStep(wait=wait)

        executor.execute_async = execute_async


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
    channel: dict[str, list[float]] = {"1": [], str(args.batch): []}
    for _ in range(args.rounds):
        for backend in ("uni", "mp"):
            llm = LLM(distributed_executor_backend=backend, **engine_variant(args))
            prompts = pydoc_prompts(llm.get_tokenizer(), args.batch, 128)
            prompts = [{"prompt_token_ids": p} for p in prompts]
            step_ms(llm, prompts[:1], 16)  # warm-up: kernels, pages
            for streams, batch in (("1", prompts[:1]), (str(args.batch), prompts)):
                timer = ChannelTimer(llm.engine.core.executor, len(batch)) if backend == "mp" else None
                results[backend][streams].append(step_ms(llm, batch, args.output_len))
                if timer is not None:
                    channel[streams].append(statistics.median(timer.samples))
            llm.engine.shutdown()
    rows = []
    for streams in ("1", str(args.batch)):
        uni = statistics.median(results["uni"][streams])
        mp = statistics.median(results["mp"][streams])
        rows.append({"streams": streams, "uni ms/step": uni, "mp ms/step": mp, "mp - uni (ms)": mp - uni,
                     "mp channel ms/step": statistics.median(channel[streams])})
    publish(f"executor overhead per decode step ({variant_name(args)}, median of {args.rounds} rounds)", rows,
            args.output, {"args": vars(args), "rows": rows, "raw": results, "channel": channel})
    return {"rows": rows}


if __name__ == "__main__":
    main()
