"""asyncllm side by side with llama.cpp's `llama-server` on the same GGUF file: single stream, W1, W2.

`make bench-llamacpp` unpacks the llama-cpp-python sdist from PyPI into .llamacpp/ (never the
project's venv), builds `llama-server` from the llama.cpp it vendors (cmake, -march=native,
OpenMP) and runs this. llama-server gets every core (-t), 8 parallel slots with continuous
batching (its default), and each slot room for a W1 sequence. The same token-id prompts go to
both engines; greedy, EOS ignored.

  single stream   one 128-token prompt, 128 tokens: llama.cpp's own decode timing
                  (`timings.predicted_per_second`, no HTTP in it) against latency.py's decode tok/s
  W1              64 × (128 in, 128 out) all at once: llama-server's 8 slots over HTTP against
                  throughput.py (offline, in process)
  W2              32 requests, 8 concurrent streams, 64 tokens each, both over HTTP (serving.py's load)
  RSS             each server process's resident memory after its W2 run, both with KV room for
                  8 x 512 tokens (asyncllm's `--kv-cache-memory` set to that)

    python benchmarks/llamacpp_compare.py [--server .llamacpp/build/bin/llama-server] [--model gemma3-270m]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import latency  # noqa: E402
import serving  # noqa: E402
import throughput  # noqa: E402
from common import add_variant_args, machine, print_table, pydoc_prompts, rss_mb, save, stop_process  # noqa: E402
from common import engine_variant, resolve_model, variant_flags, variant_name  # noqa: E402
from vllm_compare import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent


def kv_bytes(gguf: str, dtype: str, tokens: int) -> int:
    """Bytes of asyncllm's KV cache for `tokens` tokens of this model in `dtype`."""
    from asyncllm.model.loader import load_checkpoint

    cfg = load_checkpoint(gguf).config
    width = 4 if dtype == "float32" else 2
    return tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * width


class LlamaServer:
    """llama-server on 127.0.0.1, stopped by its pid."""

    def __init__(self, binary: str, gguf: str, parallel: int, slot_tokens: int, log: Path, max_wait: float = 300):
        port = free_port()
        self.log = open(log, "w")
        command = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
                   "-c", str(parallel * slot_tokens), "-t", str(os.cpu_count() or 1), "--seed", "0"]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama-server not ready after {max_wait}s; see {log}")

    def complete(self, prompt: list[int], tokens: int) -> dict:
        body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                "return_tokens": True}
        request = urllib.request.Request(self.url + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        self.log.close()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default=str(HERE.parent / ".llamacpp" / "build" / "bin" / "llama-server"))
    parser.add_argument("--tag", default="", help="appended to the result file name (e.g. the machine's name)")
    add_variant_args(parser)  # --model (a GGUF) and asyncllm's --dtype / --quantization
    args = parser.parse_args(argv)

    from asyncllm.model.default_model import default_model_path
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    gguf = resolve_model(args.model) or default_model_path()
    if not gguf.endswith(".gguf"):
        parser.error("llama.cpp runs GGUF files: --model must be one")
    prompts = pydoc_prompts(load_gguf_tokenizer(gguf), 64, 128)
    work = HERE / ".llamacpp-run"
    work.mkdir(exist_ok=True)

    # llama.cpp alone first (nothing else running), then asyncllm, each with the whole machine.
    server = LlamaServer(args.server, gguf, parallel=8, slot_tokens=512, log=work / "server.log")
    try:
        server.complete(prompts[0], 8)  # warm-up
        single = [server.complete(p, 128) for p in prompts[1:4]]
        their_decode = statistics.median(r["timings"]["predicted_per_second"] for r in single)
        their_ids = [server.complete(p, 32)["tokens"] for p in prompts[:8]]
        their_w1 = asyncio.run(serving.run_load(server.url + "/v1", prompts, 64, 128, max_retries=2))
    finally:
        server.stop()
    # W2 on a fresh server, as asyncllm's: llama-server keeps each slot's last prompt and reuses
    # it (cache_prompt), so W2's prompts, also W1's, would be cache hits.
    server = LlamaServer(args.server, gguf, parallel=8, slot_tokens=512, log=work / "server_w2.log")
    try:
        their_w2 = asyncio.run(serving.run_load(server.url + "/v1", prompts[:32], 8, 64, max_retries=2))
        their_rss = rss_mb(server.proc.pid)
    finally:
        server.stop()

    ours = variant_flags(args)
    w1 = throughput.main(ours + ["--skip-transformers", "--output", "llamacpp_compare_w1"])
    lat = latency.main(ours + ["--lengths", "128", "--skip-transformers", "--output", "llamacpp_compare_latency"])
    # The server's KV cache sized as llama-server's (8 slots x 512 tokens), not asyncllm's 1 GiB
    # default, so that the RSS compares the same context.
    ours_server = serving.AsyncLLMServer(ours + ["--kv-cache-memory", str(kv_bytes(gguf, args.dtype, 8 * 512))])
    try:
        w2 = asyncio.run(serving.run_load(ours_server.base_url, prompts[:32], 8, 64))
        our_rss = rss_mb(ours_server.proc.pid)
    finally:
        ours_server.stop()
    from asyncllm import LLM, SamplingParams

    llm = LLM(**engine_variant(args))
    ours_ids = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts[:8]], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
        use_tqdm=False)]
    llm.engine.shutdown()
    agree = sum(a == b for x, y in zip(ours_ids, their_ids) for a, b in zip(x, y)) / sum(map(len, ours_ids))

    def row(measure, ours, theirs, higher_is_better=True):
        ratio = ours / theirs if higher_is_better else theirs / ours
        return {"measure": measure, "asyncllm": round(ours, 1), "llama.cpp": round(theirs, 1),
                "asyncllm_advantage": round(ratio, 2)}

    rows = [row("single-stream decode tok/s", lat["decode_tok_per_s"], their_decode),
            row("W1 output tok/s (64 x 128/128)", w1["asyncllm_tok_per_s"], their_w1["tok_per_s"]),
            row("W2 output tok/s", w2["tok_per_s"], their_w2["tok_per_s"]),
            row("W2 TTFT p50 ms", w2["ttft_p50_ms"], their_w2["ttft_p50_ms"], higher_is_better=False),
            row("W2 ITL p50 ms", w2["itl_p50_ms"], their_w2["itl_p50_ms"], higher_is_better=False),
            row("server RSS MB after W2 (KV for 4k tokens)", our_rss, their_rss, higher_is_better=False)]
    print_table(f"asyncllm ({variant_name(args)}) vs llama.cpp llama-server (8 slots) on {os.path.basename(gguf)}; "
                "advantage > 1 means asyncllm is better", rows)
    print(f"greedy: {agree:.0%} of the first 32 tokens of 8 prompts equal llama.cpp's")
    result = {"rows": rows, "machine": machine(), "gguf": gguf, "gguf_mb": os.path.getsize(gguf) / 2**20,
              "greedy_agreement_32": agree, "llamacpp_w1": their_w1, "llamacpp_w2": their_w2,
              "llamacpp_single": [r["timings"] for r in single], "asyncllm_w2": w2}
    name = "llamacpp_compare" + (f"_{args.tag}" if args.tag else "")
    print(f"wrote {save(name, result)}")
    return result


if __name__ == "__main__":
    main()
