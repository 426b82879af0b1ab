"""Latency: single-stream decode (128 in / 128 out), TTFT against prompt length, prefix-cache hit vs miss.

Baselines in the same run, same weights and dtype: transformers `generate` for one stream.

    python benchmarks/latency.py [--dtype float32] [--lengths 128,512,1024,2048]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (Timer, add_variant_args, load_transformers, measure_bandwidth_gbs, publish,  # noqa: E402
                    pydoc_prompts, variant_name, engine_variant)


def median_seconds(run, repeats: int = 3) -> float:
    """Median wall time of `repeats` runs (a single run varies by up to 2x with the allocator)."""
    times = []
    for _ in range(repeats):
        with Timer() as t:
            run()
        times.append(t.seconds)
    return sorted(times)[len(times) // 2]


def decode_weight_bytes(model) -> int:
    """Weight bytes one single-row decode step reads: every parameter (the embedding is read
    whole as the tied logits weight), with a projection's quantised copy in place of its weight and
    the logits weight's 8-bit copy in place of it (the embedding lookup reads one row)."""
    def size(t) -> int:
        return t.numel() * t.element_size()

    total = sum(size(p) for p in model.parameters())
    for projection in model.projections():
        if projection.quantized is not None:
            total += projection.quantized.nbytes - size(projection.weight)
    if model.logits_quant is not None:
        total += model.logits_quant.nbytes - size(model.logits_weight)
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    add_variant_args(parser)
    parser.add_argument("--lengths", default="128,512,1024,2048")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--output", default="latency", help="results file name (without .json)")
    args = parser.parse_args(argv)

    import torch

    from asyncllm import LLM, SamplingParams

    bandwidth = measure_bandwidth_gbs()
    llm = LLM(**engine_variant(args), max_num_batched_tokens=4096,
              enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    bound = bandwidth * 1e9 / decode_weight_bytes(llm.engine.core.executor.worker.runner.model)  # if a step only read the weights
    prompt = pydoc_prompts(tok, 1, 128)[0]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    full = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)  # warm-up
    with Timer() as prefill:
        llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)
    with Timer() as total:
        llm.generate({"prompt_token_ids": prompt}, full, use_tqdm=False)
    ours_decode = (args.output_len - 1) / (total.seconds - prefill.seconds)
    rows = [{"measure": "single-stream decode tok/s", "asyncllm": ours_decode, "transformers": None, "ratio": None,
             "note": f"bandwidth bound {bound:.1f} tok/s ({bandwidth:.1f} GB/s); asyncllm at "
                     f"{ours_decode / bound:.0%}"}]
    lengths = [int(x) for x in args.lengths.split(",")]
    long_prompts = {n: pydoc_prompts(tok, 1, n)[0] if n <= 1024 else (pydoc_prompts(tok, 4, 512)[0] * 8)[:n]
                    for n in lengths}
    ttft = {n: median_seconds(lambda: llm.generate({"prompt_token_ids": long_prompts[n]}, one, use_tqdm=False))
            for n in lengths}
    # Prefix cache: the same 1k-token prefix, a different ending each time.
    cached = LLM(**engine_variant(args), max_num_batched_tokens=4096,
                 enable_prefix_caching=True)
    prefix = long_prompts[1024] if 1024 in long_prompts else pydoc_prompts(tok, 1, 1024)[0]
    with Timer() as miss:
        cached.generate({"prompt_token_ids": prefix + tok.encode(" Question one?")}, one, use_tqdm=False)
    with Timer() as hit:
        cached.generate({"prompt_token_ids": prefix + tok.encode(" Another question?")}, one, use_tqdm=False)
    result = {"decode_tok_per_s": ours_decode, "bandwidth_bound_tok_per_s": bound, "ttft": ttft,
              "prefix_miss_s": miss.seconds, "prefix_hit_s": hit.seconds}
    hf_decode, hf_ttft = None, {}
    if not args.skip_transformers:
        model = load_transformers(args.dtype, args.model)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, do_sample=False)
            with Timer() as hf_pre:
                model.generate(ids, max_new_tokens=1, do_sample=False)
            with Timer() as hf_total:
                model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
            hf_decode = (args.output_len - 1) / (hf_total.seconds - hf_pre.seconds)
            hf_ttft = {n: median_seconds(lambda: model.generate(torch.tensor([long_prompts[n]]), max_new_tokens=1,
                                                                do_sample=False))
                       for n in lengths}
        rows[0]["transformers"], rows[0]["ratio"] = hf_decode, ours_decode / hf_decode
        result.update(hf_decode_tok_per_s=hf_decode, hf_ttft=hf_ttft)
    for n in lengths:
        rows.append({"measure": f"TTFT, {n}-token prompt (s)", "asyncllm": ttft[n], "transformers": hf_ttft.get(n),
                     "ratio": (hf_ttft[n] / ttft[n]) if n in hf_ttft else None, "note": "ratio = speed-up"})
    rows.append({"measure": "TTFT, 1k shared prefix: miss -> hit (s)", "asyncllm": hit.seconds,
                 "transformers": None, "ratio": miss.seconds / hit.seconds,
                 "note": f"miss {miss.seconds:.3f}s; ratio = miss / hit"})
    publish(f"Latency (asyncllm {variant_name(args)}, transformers {args.dtype})", rows, args.output,
            {"rows": rows, "result": result, "args": vars(args)})
    return result


if __name__ == "__main__":
    main()
