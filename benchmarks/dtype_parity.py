"""Quality of each dtype against transformers in fp32 on the same weights (default model).

For every dtype: greedy 32-token answers to 8 chat prompts compared with transformers fp32
(identical sequences, first differing step), and teacher-forced logprobs: transformers' fp32
continuation fed back as the prompt with prompt_logprobs, so each reference token's logprob
under the dtype is compared with fp32's, whatever greedy did.

    python benchmarks/dtype_parity.py [--dtypes float32,bfloat16,float16]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import load_transformers, print_table, save  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
             "List three primary colors.", "What is 12 times 12?", "Give me a tip for learning Python.",
             "Who wrote Hamlet?", "Translate 'good morning' into Spanish."]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
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
    reference = []
    with torch.inference_mode():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            new = out.sequences[0, len(p):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
            reference.append((new, logprobs))
    del hf
    rows = []
    for name in args.dtypes.split(","):
        llm = LLM(dtype=name)
        greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                              SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
                              use_tqdm=False)
        forced = llm.generate([{"prompt_token_ids": p + new} for p, (new, _) in zip(prompts, reference)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        identical, first_diff, diffs = 0, [], []
        for p, out, scored, (new, ref_lp) in zip(prompts, greedy, forced, reference):
            ours = list(out.outputs[0].token_ids)
            identical += ours == new
            first_diff.append(next((i for i, (a, b) in enumerate(zip(ours, new)) if a != b), len(new)))
            for i, token in enumerate(new):
                entry = scored.prompt_logprobs[len(p) + i]
                diffs.append(abs(entry[token].logprob - ref_lp[i]))
        rows.append({"dtype": name, "greedy_identical": f"{identical}/{len(prompts)}",
                     "mean_first_diff_step": sum(first_diff) / len(first_diff),
                     "logprob_abs_diff_mean": sum(diffs) / len(diffs), "logprob_abs_diff_max": max(diffs)})
        llm.engine.shutdown()
        del llm
    print_table(f"dtype parity vs transformers fp32 ({args.prompts} chat prompts x {args.max_tokens} greedy "
                "tokens; logprobs teacher-forced on the fp32 continuation)", rows)
    print(f"wrote {save('dtype_parity', {'rows': rows, 'args': vars(args)})}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
