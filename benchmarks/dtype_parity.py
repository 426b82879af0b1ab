"""Quality of each dtype (and of int4 decoding) against transformers in fp32 on the same weights.

For every variant: greedy 32-token answers to 8 chat prompts (decoded together by default, as a server
would) compared with transformers fp32 (identical sequences, first differing step), and the
logprob of each token we chose against the logprob transformers fp32 gives that same token when
it scores our whole sequence, so the comparison holds whatever greedy did.

    python benchmarks/dtype_parity.py [--variants float32,bfloat16,float16,float32+int4,bfloat16+int4,float32+int8,bfloat16+int8]
                                      [--max-num-seqs N] [--output NAME]

A variant is dtype[+quantization][+kvfp8]: e.g. float32+fp8 (e4m3 weight blocks), float32+kvfp8
(kv_cache_dtype="fp8"), bfloat16+int8+kvfp8.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import first_difference, load_transformers, publish  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
             "List three primary colors.", "What is 12 times 12?", "Give me a tip for learning Python.",
             "Who wrote Hamlet?", "Translate 'good morning' into Spanish."]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants",
                        default="float32,bfloat16,float16,float32+int4,bfloat16+int4,float32+int8,bfloat16+int8",
                        help="dtype or dtype+quantization, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="decode at most this many together (default: all prompts at once); bf16 models read "
                             "8-bit blocks only in steps of <= 4 rows")
    parser.add_argument("--output", default="dtype_parity", help="results file name (without .json)")
    args = parser.parse_args(argv)

    import torch

    from asyncllm import LLM, SamplingParams

    from asyncllm.engine.input_processor import apply_chat_template
    from asyncllm.model.default_model import default_model_path
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    # The prompts as LLM.chat builds them, and transformers' fp32 continuation of each: once.
    tok = load_gguf_tokenizer(default_model_path())
    prompts = [tok.encode(apply_chat_template(tok, [{"role": "user", "content": q}]), add_special_tokens=False)
               for q in QUESTIONS[:args.prompts]]
    hf = load_transformers("float32")
    with torch.inference_mode():
        reference = [hf.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist() for p in prompts]

        def hf_logprobs(prompt: list[int], new: list[int]) -> list[float]:
            """transformers fp32's logprob of each token of `new` after `prompt` (one forward)."""
            logits = hf(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1].float()
            return torch.log_softmax(logits, -1).gather(1, torch.tensor(new)[:, None])[:, 0].tolist()

        rows = []
        for variant in args.variants.split(","):
            dtype, *options = variant.split("+")
            quantization = next((o for o in options if o != "kvfp8"), None)
            llm = LLM(dtype=dtype, quantization=quantization, kv_cache_dtype="fp8" if "kvfp8" in options else "auto",
                      max_num_seqs=args.max_num_seqs or len(prompts))
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, logprobs=0),
                                use_tqdm=False)
            identical, first_diff, diffs = 0, [], []
            for p, out, ref in zip(prompts, outs, reference):
                ours = list(out.outputs[0].token_ids)
                identical += ours == ref
                first_diff.append(first_difference(ours, ref))
                theirs = hf_logprobs(p, ours)
                diffs += [abs(step[t].logprob - lp) for step, t, lp in zip(out.outputs[0].logprobs, ours, theirs)]
            rows.append({"variant": variant, "greedy_identical": f"{identical}/{len(prompts)}",
                         "mean_first_diff_step": sum(first_diff) / len(first_diff),
                         "logprob_abs_diff_mean": sum(diffs) / len(diffs), "logprob_abs_diff_max": max(diffs)})
            llm.engine.shutdown()
            del llm
    together = args.max_num_seqs or len(prompts)
    publish(f"Parity vs transformers fp32 ({len(prompts)} chat prompts x {args.max_tokens} greedy tokens, "
            f"decoded {together} at a time; logprobs of our tokens vs transformers fp32 scoring our sequence)", rows,
            args.output, {"rows": rows, "args": vars(args)})
    return {"rows": rows}


if __name__ == "__main__":
    main()
