"""Beam search: asyncllm's LLM.beam_search against transformers' generate(num_beams=...) on the
same prompts and weights, in one run (default model, beam width 4, 32 tokens).

    python benchmarks/beam_search.py [--num-prompts 4] [--beam-width 4] [--max-tokens 32] [--dtype float32]
                                     [--block-size 16]

Each step's beams continue their parents' prompts: whole blocks come from the prefix cache and the
last, partial one is copied (copy-on-write), so a step computes one token per beam.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import Timer, publish  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 3 + 4?", "Who wrote Hamlet?",
             "Give me a fruit.", "What is water made of?", "Name a planet.", "What do bees make?"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from asyncllm import LLM, BeamSearchParams
    from asyncllm.model.default_model import default_model_path

    llm = LLM(dtype=args.dtype, block_size=args.block_size)
    engine = llm.engine
    prompts = [engine.input_processor.process_prompt([{"role": "user", "content": q}]).prompt_token_ids
               for q in (QUESTIONS * 4)[:args.num_prompts]]
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens)
    llm.beam_search([{"prompt_token_ids": prompts[0]}], params)  # warm up
    with Timer() as ours:
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    rows = [{"engine": "asyncllm", "seconds": ours.seconds, "prompts_per_s": len(prompts) / ours.seconds}]
    same = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        path = default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=getattr(torch, args.dtype)).eval()
        eos = list(engine.eos_token_ids)
        same = 0
        with Timer() as theirs:
            for prompt, out in zip(prompts, outs):
                with torch.inference_mode():
                    result = hf.generate(torch.tensor([prompt]), num_beams=args.beam_width, max_new_tokens=args.max_tokens,
                                         do_sample=False, early_stopping=False, eos_token_id=eos, pad_token_id=eos[0])
                best = result[0, len(prompt):].tolist()
                ours_best = out.sequences[0].output_token_ids
                same += best[:len(ours_best)] == ours_best
        rows.append({"engine": "transformers", "seconds": theirs.seconds, "prompts_per_s": len(prompts) / theirs.seconds})
        for row in rows:
            row["ratio"] = theirs.seconds / row["seconds"]
    result = {"rows": rows, "same_best_beam": same, "args": vars(args)}
    publish(f"Beam search: {len(prompts)} chat prompts, width {args.beam_width}, {args.max_tokens} tokens, "
            f"{args.dtype}, block size {args.block_size}", rows, "beam_search", result)
    engine.shutdown()
    return result


if __name__ == "__main__":
    main()
