"""W1 offline throughput: 64 prompts x 128 real-text tokens -> 128 tokens each, greedy, EOS ignored.

Baselines measured in the same run on the same weights and dtype: transformers `generate`
as one static batch (all prompts are exactly 128 tokens, so no padding waste), and one
prompt at a time (on a few prompts; reported as tokens/s).

    python benchmarks/throughput.py [--num-prompts 64] [--dtype float32] [--model gemma3-270m] [--skip-transformers]

Single stream too: asyncllm and transformers each on the same `--one-at-a-time` prompts, one by one.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (Timer, add_variant_args, engine_variant, first_difference,  # noqa: E402
                    hf_generate_seconds, load_transformers, measure_matmul_gflops, publish, pydoc_prompts,
                    variant_name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--one-at-a-time", type=int, default=2, help="prompts for the one-at-a-time baseline")
    add_variant_args(parser)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--agreement-with", default=None, metavar="DTYPE",
                        help="also run W1's prompts in this dtype (e.g. float32) and report how many greedy outputs "
                             "are identical to the measured run's, and where the others first differ")
    parser.add_argument("--output", default="throughput", help="results file name (without .json)")
    args = parser.parse_args(argv)

    import torch

    from asyncllm import LLM, SamplingParams

    gflops = measure_matmul_gflops(torch.float32)
    with Timer() as load:
        # An offline batch job takes its KV cache up front, as vLLM's LLM does (its load time below
        # includes that); lazily mapped, this run's first steps page-fault ~750 MB of cache in.
        llm = LLM(**engine_variant(args), max_num_seqs=args.num_prompts,
                  max_num_batched_tokens=2048, kv_cache_prefault=True)
    prompts = pydoc_prompts(llm.get_tokenizer(), args.num_prompts, args.input_len)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=4), use_tqdm=False)
    with Timer() as t:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ours = tokens / t.seconds
    with Timer() as one_t:  # single stream: the same prompts as transformers' one-at-a-time baseline
        for prompt in prompts[:args.one_at_a_time]:
            llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    ours_one = args.one_at_a_time * args.output_len / one_t.seconds
    agreement = None
    if args.agreement_with:
        other = LLM(**{**engine_variant(args), "dtype": args.agreement_with}, max_num_seqs=args.num_prompts,
                    max_num_batched_tokens=2048)
        theirs = other.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        other.engine.shutdown()
        steps = [first_difference(list(a.outputs[0].token_ids), list(b.outputs[0].token_ids))
                 for a, b in zip(outs, theirs)]
        agreement = {"dtype": args.agreement_with, "identical": sum(s == args.output_len for s in steps),
                     "of": len(steps), "mean_first_difference": sum(steps) / len(steps)}
    dtype = llm.engine.core.dtype  # the peak of the dtype the engine computes in (bf16 where `auto` picks it)
    peak = gflops if dtype == torch.float32 else measure_matmul_gflops(dtype)
    # FLOPs per generated token ~ 2 x parameters (+ the prefill of the prompt tokens).
    model = llm.engine.core.executor.worker.runner.model
    n_params = (sum(p.numel() for p in model.parameters())  # + the projections that keep only blocks
                + sum(p.in_features * p.out_features for p in model.projections() if p.dense_dropped))
    flops = 2 * n_params * (tokens + args.num_prompts * args.input_len)
    rows = [{"system": f"asyncllm LLM ({variant_name(args)})", "tok_per_s": ours, "seconds": t.seconds,
             "vs_hf_batch": None, "fraction_of_peak": flops / t.seconds / 1e9 / peak},
            {"system": "asyncllm one at a time", "tok_per_s": ours_one, "seconds": one_t.seconds,
             "vs_hf_batch": None, "fraction_of_peak": None}]
    result = {"asyncllm_tok_per_s": ours, "asyncllm_one_tok_per_s": ours_one, "fp32_gflops": gflops,
              "peak_gflops": peak, "peak_dtype": str(dtype).removeprefix("torch."),
              "asyncllm_load_seconds": load.seconds, "model": args.model or "default", "agreement": agreement}
    if not args.skip_transformers:
        model = load_transformers(args.dtype, args.model)
        batch = torch.tensor(prompts)
        with torch.inference_mode(), Timer() as hf_t:
            model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.output_len,
                           min_new_tokens=args.output_len, do_sample=False)
        hf_batch = args.num_prompts * args.output_len / hf_t.seconds
        one_seconds = hf_generate_seconds(model, prompts[:args.one_at_a_time], args.output_len)
        hf_one = args.one_at_a_time * args.output_len / one_seconds
        rows[0]["vs_hf_batch"] = ours / hf_batch
        rows[1]["vs_hf_batch"] = ours_one / hf_batch
        rows += [{"system": f"transformers static batch {args.num_prompts}", "tok_per_s": hf_batch,
                  "seconds": hf_t.seconds, "vs_hf_batch": 1.0, "fraction_of_peak": None},
                 {"system": "transformers one at a time", "tok_per_s": hf_one, "seconds": one_seconds,
                  "vs_hf_batch": hf_one / hf_batch, "fraction_of_peak": None}]
        result.update(hf_batch_tok_per_s=hf_batch, hf_one_tok_per_s=hf_one, ratio_vs_hf_batch=ours / hf_batch,
                      ratio_vs_hf_one=ours / hf_one, single_stream_ratio_vs_hf_one=ours_one / hf_one)
    publish(f"W1 throughput: {args.num_prompts} x {args.input_len} in / {args.output_len} out, greedy "
            f"({str(dtype).removeprefix('torch.')} matmul peak measured now: {peak:.0f} GFLOPS)", rows, args.output,
            {"rows": rows, "result": result, "args": vars(args)})
    if agreement:
        print(f"greedy outputs identical to {agreement['dtype']}'s: {agreement['identical']}/{agreement['of']} "
              f"(mean first difference at step {agreement['mean_first_difference']:.1f} of {args.output_len})")
    return result


if __name__ == "__main__":
    main()
