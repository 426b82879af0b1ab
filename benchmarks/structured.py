"""Structured-output overhead: tokens/s of one batch, free vs JSON-schema constrained
(outlines-core's automaton) vs the same schema inside a Lark grammar (llguidance's parser).

    python benchmarks/structured.py [--batch 16] [--max-tokens 64] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import Timer, publish  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["title", "year", "tags"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from asyncllm import LLM, SamplingParams, StructuredOutputs

    llm = LLM(dtype=args.dtype)
    prompts = [[{"role": "user", "content": f"Describe film number {i} as JSON."}] for i in range(args.batch)]
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                 structured_outputs=StructuredOutputs(json=SCHEMA))
    grammar = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                             structured_outputs=StructuredOutputs(grammar="start: %json " + json.dumps(SCHEMA)))
    llm.chat(prompts[:1], constrained, use_tqdm=False)  # compile once (cached), warm up
    llm.chat(prompts[:1], grammar, use_tqdm=False)
    rows = []
    for name, params in [("free", free), ("json_schema", constrained), ("lark_grammar", grammar)]:
        with Timer() as t:
            outs = llm.chat(prompts, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"run": name, "batch": args.batch, "output_tokens": tokens, "seconds": t.seconds,
                     "tok_per_s": tokens / t.seconds})
    for row in rows:
        row["ratio_vs_free"] = row["tok_per_s"] / rows[0]["tok_per_s"]
    publish("Structured outputs: same batch, free vs constrained", rows, "structured",
            {"rows": rows, "args": vars(args)})
    return {"rows": rows}


if __name__ == "__main__":
    main()
