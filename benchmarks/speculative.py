"""Speculative decoding: single-stream decode tok/s of plain decoding, ngram, suffix and a draft
model (the default model's own int8 copy: the pair that exists here) on the same engine settings,
on copy-heavy chat prompts (repeat / quote a pydoc section of ~300-600 tokens) and on free
generation, greedy; the outputs must be identical. The acceptance rate (accepted / proposed
tokens) is printed for each method. Decode tok/s counts the tokens after the first over the time
from the first token to the last (the prompt's computation is not decoding, and speculation
cannot shorten it); e2e tok/s counts every token over the whole request.

    python benchmarks/speculative.py [--num-prompts 3] [--max-tokens 96] [--dtype float32]
    python benchmarks/speculative.py --w1 [--dtype float32] [--rounds 3]   # the cost on a W1 batch instead

--w1: 64 pydoc prompts of 128 tokens, 128 greedy tokens each, all at once: plain decoding against
ngram (k 7) without a batch-size rule and with the default one (`disable_by_batch_size` 6: no
proposals while 6 or more requests run), alternating rounds, median of --rounds.
--batch-sweep: where that default comes from (ngram against plain at 1-16 streams).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import Timer, publish, pydoc_prompts  # noqa: E402

METHODS = {
    "plain": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 7},
    # The default model proposing for itself from its 8-bit copy (model filled in at run time).
    "draft_model int8": {"method": "draft_model", "quantization": "int8", "num_speculative_tokens": 4},
}


def copy_prompts(tokenizer, n: int) -> list[str]:
    import pydoc_data.topics as topics

    sections = [t for t in topics.topics.values() if 300 <= len(tokenizer.encode(t)) <= 600][:n]
    asks = ["Repeat this text exactly:\n\n{}", "Quote the following documentation word for word:\n\n{}"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": asks[i % 2].format(s)}], tokenize=False,
                                          add_generation_prompt=True) for i, s in enumerate(sections)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--disable-by-acceptance-rate", type=float, default=None,
                        help="that speculative_config key for every method (default: unset, i.e. off)")
    parser.add_argument("--w1", action="store_true", help="measure the cost on a W1 batch (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="--w1: alternating rounds (medians reported)")
    parser.add_argument("--batch-sweep", action="store_true",
                        help="ngram against plain on B concurrent free-text streams, B = 1, 2, 4, 6, 8, 16: where "
                             "verification stops paying (disable_by_batch_size's default)")
    args = parser.parse_args(argv)
    if args.w1:
        return w1_cost(args, rounds=args.rounds)
    if args.batch_sweep:
        return batch_sweep(args)
    extra = {"disable_by_acceptance_rate": args.disable_by_acceptance_rate}

    from asyncllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    rows, outputs = [], {}
    from asyncllm.model.default_model import default_model_path

    for name, spec in METHODS.items():
        if spec is not None and spec["method"] == "draft_model":
            spec = {**spec, "model": default_model_path()}
        llm = LLM(dtype=args.dtype, speculative_config=None if spec is None else {**spec, **extra})
        tok = llm.get_tokenizer()
        workloads = {"copy": copy_prompts(tok, args.num_prompts),
                     "free": [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                      add_generation_prompt=True)
                              for q in ("Write a short story about a lighthouse.", "Explain how rain forms.",
                                        "Describe your ideal weekend.")[:args.num_prompts]]}
        llm.generate(workloads["free"][:1], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)  # warm up
        core = llm.engine.core
        for workload, prompts in workloads.items():
            proposed, accepted = core.num_draft_tokens, core.num_accepted_tokens
            tokens, seconds, decode_seconds, texts = 0, 0.0, 0.0, []
            for prompt in prompts:  # one stream at a time
                with Timer() as t:
                    out = llm.generate(prompt, params, use_tqdm=False)[0]
                seconds += t.seconds
                decode_seconds += out.metrics.last_token_time - out.metrics.first_token_time
                tokens += len(out.outputs[0].token_ids)
                texts.append(out.outputs[0].token_ids)
            outputs[(name, workload)] = texts
            proposed, accepted = core.num_draft_tokens - proposed, core.num_accepted_tokens - accepted
            decode = (tokens - len(prompts)) / decode_seconds if decode_seconds else float("nan")
            rows.append({"method": name, "workload": workload, "tokens": tokens, "tok_per_s": decode,
                         "e2e_tok_per_s": tokens / seconds, "acceptance": accepted / proposed if proposed else 0.0})
        llm.engine.shutdown()
    plain = {r["workload"]: r["tok_per_s"] for r in rows if r["method"] == "plain"}
    plain_e2e = {r["workload"]: r["e2e_tok_per_s"] for r in rows if r["method"] == "plain"}
    for row in rows:
        row["speedup"] = row["tok_per_s"] / plain[row["workload"]]
        row["e2e_speedup"] = row["e2e_tok_per_s"] / plain_e2e[row["workload"]]
        row["same_tokens"] = outputs[(row["method"], row["workload"])] == outputs[("plain", row["workload"])]
    publish(f"Speculative decoding, single stream, greedy, {args.dtype}, {args.max_tokens} tokens", rows,
            "speculative", {"rows": rows, "args": vars(args)})
    return {"rows": rows}


def batch_sweep(args, sizes: tuple[int, ...] = (1, 2, 4, 6, 8, 16), length: int = 64) -> dict:
    """Free text (pydoc prompts of 128 tokens continued, little to copy) at B concurrent streams:
    plain against ngram k 7 with no batch-size rule, alternating, median of `args.rounds`."""
    import statistics

    from asyncllm import LLM, SamplingParams

    ngram = {**METHODS["ngram"], "disable_by_batch_size": None}  # explicitly never off
    params = SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)
    engines = {name: LLM(dtype=args.dtype, speculative_config=spec) for name, spec in (("plain", None),
                                                                                         ("ngram", ngram))}
    prompts = [{"prompt_token_ids": p} for p in pydoc_prompts(engines["plain"].get_tokenizer(), max(sizes), 128)]
    for llm in engines.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)  # warm up
    rows = []
    for size in sizes:
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, llm in engines.items():
                with Timer() as t:
                    outs = llm.generate(prompts[:size], params, use_tqdm=False)
                speeds[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / t.seconds)
        rows.append({"streams": size, "plain_tok_per_s": statistics.median(speeds["plain"]),
                     "ngram_tok_per_s": statistics.median(speeds["ngram"]),
                     "ngram_vs_plain": statistics.median([n / p for n, p in zip(speeds["ngram"], speeds["plain"])])})
    for llm in engines.values():
        llm.engine.shutdown()
    publish(f"ngram (k 7) against plain decoding by concurrent streams, free text, {args.dtype}", rows,
            "speculative_batch_sweep", {"rows": rows, "args": vars(args)})
    return {"rows": rows}


def w1_cost(args, rounds: int = 3, num_prompts: int = 64, length: int = 128) -> dict:
    import statistics

    from asyncllm import LLM, SamplingParams

    ngram = METHODS["ngram"]
    configs = {"plain": None, "ngram, no batch-size rule": {**ngram, "disable_by_batch_size": None},
               "ngram (default rule: off from 6 streams)": ngram}
    params = SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    outputs, work = {}, {}
    for _ in range(rounds):
        for name, spec in configs.items():
            llm = LLM(dtype=args.dtype, speculative_config=spec)
            prompts = [{"prompt_token_ids": p} for p in pydoc_prompts(llm.get_tokenizer(), num_prompts, length)]
            llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)  # warm up
            core = llm.engine.core
            steps, drafts = core.num_steps, core.num_draft_tokens
            with Timer() as t:
                outs = llm.generate(prompts, params, use_tqdm=False)
            speeds[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / t.seconds)
            outputs[name] = [o.outputs[0].token_ids for o in outs]
            work[name] = (core.num_steps - steps, core.num_draft_tokens - drafts)  # the same every round
            llm.engine.shutdown()
    plain = statistics.median(speeds["plain"])
    rows = []
    for name in configs:
        # Each round's ratio to the plain run beside it: the machine's drift between rounds cancels.
        paired = [s / p for s, p in zip(speeds[name], speeds["plain"])]
        rows.append({"method": name, "tok_per_s": statistics.median(speeds[name]),
                     "vs_plain": statistics.median(speeds[name]) / plain,
                     "median_round_ratio": statistics.median(paired),
                     "steps": work[name][0], "draft_tokens": work[name][1],
                     "same_tokens": outputs[name] == outputs["plain"]})
    publish(f"Speculative decoding on W1 ({num_prompts} x ({length} in, {length} out)), {args.dtype}, median of "
            f"{rounds}", rows, "speculative_w1", {"rows": rows, "speeds": speeds, "args": vars(args)})
    return {"rows": rows}


if __name__ == "__main__":
    main()
