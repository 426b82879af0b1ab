"""GPTQ / AWQ / FP8 checkpoints of the default model's shape: weight memory and speed against the dense model.

The default model's GGUF is dequantised into an HF folder (fp32), then packed as GPTQ and AWQ
(4 bits, groups of --group-size) and written as an FP8 checkpoint (e4m3, a scale per output row),
by tests/quant_packers.py; the dense folder also runs with quantization int8 and fp8 (e4m3 blocks
with a scale per 32 inputs), weights only. Each variant loads in its own
process (so resident memory is its own): the weights' memory is the process's RSS after the
load minus before it (the KV cache is allocated lazily and small here); then one stream
(128-token prompt, 128 greedy tokens) and a batch of 16 (128 in, 64 out). Greedy agreement:
the first 32 tokens of 8 prompts against the dense fp32 engine (the 4-bit packing re-rounds the
weights, so this measures the packing's loss, not the engine's).

    python benchmarks/quantized_checkpoint.py [--group-size 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import Timer, machine, pydoc_prompts, publish, rss_mb  # noqa: E402


def run_one(path: str, engine_args: dict) -> dict:
    """In this process: load, measure, → the row."""
    import torch  # noqa: F401  (its import is not the model's memory)

    from asyncllm import LLM, SamplingParams

    before = rss_mb()
    with Timer() as load:
        llm = LLM(path, kv_cache_memory=256 << 20, **engine_args)
    weights_mb = rss_mb() - before
    tok = llm.get_tokenizer()
    prompts = pydoc_prompts(tok, 16, 128)
    greedy = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    with Timer() as one:
        llm.generate([{"prompt_token_ids": prompts[1]}], greedy, use_tqdm=False)
    batch = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    with Timer() as many:
        llm.generate([{"prompt_token_ids": p} for p in prompts], batch, use_tqdm=False)
    check = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    ids = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], check,
                                                       use_tqdm=False)]
    llm.engine.shutdown()
    return {"weights_mb": round(weights_mb), "rss_mb": round(rss_mb()), "load_s": round(load.seconds, 2),
            "single_stream_tok_s": round(128 / one.seconds, 1), "batch16_out_tok_s": round(16 * 64 / many.seconds, 1),
            "ids": ids}


def build_checkpoints(root: str, group_size: int) -> dict[str, str]:
    """The dense HF folder of the default model and its GPTQ and AWQ packings → name → folder."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from quant_packers import pack_awq, pack_gptq, write_fp8, write_quantized
    from vllm_compare import export_hf_folder

    dense = str(export_hf_folder(Path(root) / "dense"))
    write_quantized(dense, os.path.join(root, "gptq"),
                    {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False},
                    lambda name, w: pack_gptq(w, 4, group_size, False, False, seed=0))
    write_quantized(dense, os.path.join(root, "awq"),
                    {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"},
                    lambda name, w: pack_awq(w, group_size))
    write_fp8(dense, os.path.join(root, "fp8"), None)
    return {name: os.path.join(root, name) for name in ("dense", "gptq", "awq", "fp8")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON [path, engine_args]
    args = parser.parse_args(argv)
    if args.one:
        path, engine_args = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(path, engine_args)))
        return {}
    variants = [("dense fp32", "dense", {"dtype": "float32"}),
                ("dense fp32 + int4, weights only", "dense",
                 {"dtype": "float32", "quantization": "int4", "quantized_weights_only": True}),
                ("dense fp32 + int8, weights only", "dense",
                 {"dtype": "float32", "quantization": "int8", "quantized_weights_only": True}),
                ("dense fp32 + fp8, weights only", "dense",
                 {"dtype": "float32", "quantization": "fp8", "quantized_weights_only": True}),
                (f"GPTQ 4-bit g{args.group_size}", "gptq", {}),
                (f"AWQ 4-bit g{args.group_size}", "awq", {}),
                ("FP8 checkpoint (per-row scales)", "fp8", {})]
    with tempfile.TemporaryDirectory() as root:
        folders = build_checkpoints(root, args.group_size)
        sizes = {name: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".safetensors"))
                 for name, p in folders.items()}
        rows, reference, outputs = [], None, {}
        for label, folder, engine_args in variants:
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps([folders[folder], engine_args])],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.split("RESULT ", 1)[1])
            ids = outputs[folder] = result.pop("ids")
            reference = reference or ids
            agree = sum(a == b for x, y in zip(ids, reference) for a, b in zip(x, y)) / sum(map(len, reference))
            rows.append({"variant": label, "file_mb": round(sizes[folder] / 2**20), **result,
                         "greedy_agreement_vs_dense": round(agree, 3)})
    # the two packings hold the same codes, scales and zeros: the same weights, so the same tokens
    print("GPTQ and AWQ give the same greedy tokens:", outputs["gptq"] == outputs["awq"])
    return publish("Quantised checkpoints of the default model's shape (one process each)", rows,
                   "quantized_checkpoint", {"machine": machine(), "group_size": args.group_size, "rows": rows})


if __name__ == "__main__":
    main()
