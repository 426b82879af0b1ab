"""vLLM's side of the comparison, run by vllm_compare.py with the vLLM venv's python (never the
project's): W1 through vLLM's offline `LLM` and single-stream decode, on prompts given as token ids.

    .venv-vllm/bin/python benchmarks/vllm_offline.py --model DIR --prompts prompts.json --out out.json
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.load(open(args.prompts))
    started = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=len(prompts), seed=0)
    load_seconds = time.perf_counter() - started
    full = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    as_inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(as_inputs[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(as_inputs, full, use_tqdm=False)
    w1_seconds = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    t = time.perf_counter()
    llm.generate(as_inputs[:1], one, use_tqdm=False)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(as_inputs[:1], full, use_tqdm=False)
    single = time.perf_counter() - t
    json.dump({"load_seconds": load_seconds, "w1_tok_per_s": tokens / w1_seconds, "w1_seconds": w1_seconds,
               "single_decode_tok_per_s": (args.output_len - 1) / (single - prefill),
               "token_ids": [list(o.outputs[0].token_ids) for o in outs]}, open(args.out, "w"))


if __name__ == "__main__":
    main()
