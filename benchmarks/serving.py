"""W2 online serving: 32 requests, 8 concurrent streams, max_tokens 64, against any OpenAI-compatible server.

Measures TTFT and inter-token latency (p50/p99, from the arrival times of streamed chunks)
and output tokens/s over the whole run, with the real `openai` client. Prompts are 128
real-text tokens sent as token ids, so every server sees exactly the same input.

Without --base-url it starts `asyncllm serve` itself on 127.0.0.1 (port 0, stopped by pid).
Baseline in the same run: transformers `generate` one request at a time on the same weights
and dtype (what a naive server that runs `generate` per request would deliver).

    python benchmarks/serving.py [--base-url http://127.0.0.1:8000/v1] [--dtype float32]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (Timer, add_variant_args, hf_generate_seconds, load_transformers, publish,  # noqa: E402
                    pydoc_prompts, stop_process, variant_flags, variant_name)


@dataclass
class StreamTiming:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def one_stream(client, model: str, prompt: list[int], max_tokens: int) -> StreamTiming:
    timing = StreamTiming()
    start = last = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first = True
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            timing.tokens = chunk.usage.completion_tokens
        if not chunk.choices or not chunk.choices[0].text:
            continue
        if first:
            timing.ttft, first = now - start, False
        else:
            timing.gaps.append(now - last)
        last = now
    return timing


async def run_load(base_url: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                   api_key: str = "none", max_retries: int = 0) -> dict:
    """max_retries: the client's, for servers that close idle keep-alive connections under it
    (llama-server): a request on such a connection fails before the server sees it."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=600)
    model = (await client.models.list()).data[0].id
    await one_stream(client, model, prompts[0], 2)  # warm-up: first request pays lazy set-up
    gate = asyncio.Semaphore(concurrency)

    async def limited(prompt):
        async with gate:
            return await one_stream(client, model, prompt, max_tokens)

    with Timer() as wall:
        timings = await asyncio.gather(*(limited(p) for p in prompts))
    await client.close()
    ttfts = [t.ttft for t in timings]
    gaps = [g for t in timings for g in t.gaps]
    tokens = sum(t.tokens for t in timings)
    return {"model": model, "requests": len(prompts), "output_tokens": tokens, "seconds": wall.seconds,
            "tok_per_s": tokens / wall.seconds,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "itl_p50_ms": 1000 * percentile(gaps, 50), "itl_p99_ms": 1000 * percentile(gaps, 99),
            "ttft_mean_ms": 1000 * statistics.fmean(ttfts)}


class AsyncLLMServer:
    """`asyncllm serve` on 127.0.0.1, port 0 (the CLI prints the port it got), stopped by its pid."""

    def __init__(self, engine_flags: list[str], max_wait: float = 120.0):
        cli = os.path.join(os.path.dirname(sys.executable), "asyncllm")
        # W2 has no structured requests: no grammar workers, and no first-ever json_object compile
        # running beside the measured streams.
        command = [cli, "serve", "--port", "0", "--log-level", "warning", "--no-structured-outputs-warmup",
                   *engine_flags]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + max_wait
        for line in self.proc.stdout:
            match = re.search(r"serving (http://[\d.]+:\d+)", line)
            if match:
                self.base_url = match.group(1) + "/v1"
                # Keep draining its output so a chatty server never blocks on a full pipe.
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("asyncllm serve did not start")

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default=None, help="an OpenAI-compatible /v1 URL (default: start asyncllm)")
    parser.add_argument("--label", default=None, help="name of the server in the table")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    add_variant_args(parser)
    parser.add_argument("--hf-requests", type=int, default=4, help="requests for the transformers baseline")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--output", default="serving", help="results file name (without .json)")
    parser.add_argument("--server-args", default="", help="more `asyncllm serve` options, e.g. "
                                                          "'--max-num-batched-tokens 512'")
    args = parser.parse_args(argv)

    from asyncllm.model.default_model import default_model_path
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    prompts = pydoc_prompts(load_gguf_tokenizer(default_model_path()), args.num_requests, args.input_len)
    server = None
    if args.base_url is None:
        server = AsyncLLMServer(variant_flags(args) + shlex.split(args.server_args))
        base_url, label = server.base_url, args.label or f"asyncllm serve ({variant_name(args)})"
    else:
        base_url, label = args.base_url, args.label or args.base_url
    try:
        measured = asyncio.run(run_load(base_url, prompts, args.concurrency, args.max_tokens))
    finally:
        if server is not None:
            server.stop()
    rows = [{"server": label, **{k: measured[k] for k in ("tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
                                                           "itl_p50_ms", "itl_p99_ms")}, "vs_hf_one": None}]
    result = {"server": label, **measured}
    if not args.skip_transformers:
        seconds = hf_generate_seconds(load_transformers(args.dtype, args.model), prompts[:args.hf_requests], args.max_tokens)
        hf_one = args.hf_requests * args.max_tokens / seconds
        rows[0]["vs_hf_one"] = measured["tok_per_s"] / hf_one
        rows.append({"server": "transformers generate, one request at a time", "tok_per_s": hf_one,
                     "ttft_p50_ms": None, "ttft_p99_ms": None, "itl_p50_ms": None, "itl_p99_ms": None,
                     "vs_hf_one": 1.0})
        result.update(hf_one_tok_per_s=hf_one, ratio_vs_hf_one=measured["tok_per_s"] / hf_one)
    publish(f"W2 serving: {args.num_requests} requests, {args.concurrency} concurrent streams, "
            f"{args.input_len} in / {args.max_tokens} out", rows, args.output,
            {"rows": rows, "result": result, "args": vars(args)})
    return result


if __name__ == "__main__":
    main()
