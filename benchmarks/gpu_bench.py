"""The GPU check's measurements (make gpu-check runs it after the kernel tests), in three parts,
each written to the JSON as soon as it is done, so a failure later leaves the earlier results:

1. parity: a random model of the default model's shape (SmolLM2-135M: 30 layers, 9 heads, 3 KV
   heads; the 94 MB default GGUF cannot travel to the GPU machine) on the Triton kernels against
   transformers on the same weights and device: fp32 greedy ids must be equal (the check fails
   loudly otherwise), bf16 agreement and |logprob diff| are reported.
2. kernels: the Triton paged decode and varlen prefill kernels against torch SDPA with the flash
   backend at decode and prefill shapes; decode as achieved K/V bandwidth and its fraction of
   SDPA-flash's on the same bytes (contiguous, no block table), prefill as a time ratio.
3. engine: single stream (decode tok/s), W1 (64 x 128 in / 128 out) and W2-shaped offline (256
   requests of 32-512 in / 128 out) in bf16, with CUDA graphs and with enforce_eager, on the
   135M shape and on a Llama-3.2-1B shape (random weights, the default tokenizer's vocabulary).

    python benchmarks/gpu_bench.py --out OUT.json            # on a CUDA machine (make gpu-check)
    python benchmarks/gpu_bench.py --smoke --out OUT.json    # tiny shapes, any device (the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import machine  # noqa: E402

SHAPES = {  # LlamaConfig fields of the random models
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
}


def save_random_model(shape: str, folder: str, tokenizer_dir: str) -> str:
    """A random LlamaForCausalLM of `shape` with the tokenizer's vocabulary, saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if shape == "llama-3.2-1b-shape":  # only benchmarked in bf16: half the bytes to write and read
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def parity(path: str, device: str, smoke: bool) -> dict:
    """fp32 greedy ids equal to transformers (raises otherwise); bf16 agreement reported."""
    import torch
    from transformers import AutoModelForCausalLM

    from asyncllm import LLM, SamplingParams

    prompts = _prompts(4 if not smoke else 2, [40, 17, 64, 9], 1000, seed=1)
    max_tokens = 8 if smoke else 32
    result = {}
    for dtype in ("float32", "bfloat16"):
        torch_dtype = getattr(torch, dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        llm = LLM(path, dtype=dtype, device=device, kernels="triton", kv_cache_memory=64 << 20,
                  gpu_memory_utilization=0.5)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=1)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            llm.engine.shutdown()
            _free(device)
        equal, diffs = 0, []
        for prompt, out in zip(prompts, outs):
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                gen = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=0)
            hf_tokens = gen.sequences[0, len(prompt):].tolist()
            got = out.outputs[0].token_ids
            equal += got == hf_tokens
            for step, (token, scores) in enumerate(zip(got, gen.scores)):
                if step and got[:step] != hf_tokens[:step]:
                    break
                want = torch.log_softmax(scores[0].float(), -1)[token].item()
                diffs.append(abs(out.outputs[0].logprobs[step][token].logprob - want))
        result[dtype] = {"prompts": len(prompts), "greedy_equal": equal, "max_abs_logprob_diff": max(diffs)}
        del hf
        if dtype == "float32" and equal != len(prompts):
            raise AssertionError(f"fp32 greedy ids differ from transformers on {len(prompts) - equal} of "
                                 f"{len(prompts)} prompts: {result}")
    return result


def _free(device: str) -> None:
    """The last engine's cache and weights back to the device before the next one sizes its own."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _time(fn, device: str, reps: int) -> float:
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps


def kernels(device: str, smoke: bool) -> list[dict]:
    """Paged decode and varlen prefill (Triton) against SDPA-flash on contiguous K/V."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from asyncllm_kernels import paged_decode_attention, varlen_prefill_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]
    reps = 3 if smoke else 50
    heads, kv_heads, dim, block = (4, 2, 16, 16) if smoke else (32, 8, 128, 16)
    rows = []
    decode_shapes = [(2, 64)] if smoke else [(1, 4096), (16, 2048), (64, 1024), (64, 4096), (256, 512)]
    for batch, context in decode_shapes:
        blocks_per_seq = -(-context // block)
        cache = torch.randn(2, batch * blocks_per_seq, block, kv_heads, dim, dtype=dtype, device=device)
        table = torch.randperm(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
        paged = _time(lambda: paged_decode_attention(q, cache, table, lens, dim ** -0.5), device, reps)
        k = torch.randn(batch, heads, context, dim, dtype=dtype, device=device)  # flash takes heads equal
        v = torch.randn_like(k)
        q4 = q.unsqueeze(2)
        with sdpa_kernel(backend):
            flash = _time(lambda: F.scaled_dot_product_attention(q4, k, v), device, reps)
        kv_bytes = 2 * batch * context * kv_heads * dim * cache.element_size()
        flash_bytes = 2 * batch * context * heads * dim * k.element_size()
        rows.append({"kernel": "paged_decode", "batch": batch, "context": context, "ms": paged * 1e3,
                     "sdpa_flash_ms": flash * 1e3, "GB_per_s": kv_bytes / paged / 1e9,
                     "sdpa_flash_GB_per_s": flash_bytes / flash / 1e9,
                     "bandwidth_vs_flash": (kv_bytes / paged) / (flash_bytes / flash)})
    prefill_shapes = [(1, 32)] if smoke else [(1, 512), (1, 2048), (4, 1024), (8, 512)]
    for seqs, length in prefill_shapes:
        blocks_per_seq = -(-length // block)
        cache = torch.randn(2, seqs * blocks_per_seq, block, kv_heads, dim, dtype=dtype, device=device)
        table = torch.arange(seqs * blocks_per_seq, device=device).view(seqs, blocks_per_seq)
        starts = torch.arange(0, (seqs + 1) * length, length, dtype=torch.int32, device=device)
        lens = torch.full((seqs,), length, dtype=torch.int32, device=device)
        q = torch.randn(seqs * length, heads, dim, dtype=dtype, device=device)
        paged = _time(lambda: varlen_prefill_attention(q, cache, table, starts, lens, length, dim ** -0.5),
                      device, reps)
        qf = torch.randn(seqs, heads, length, dim, dtype=dtype, device=device)
        kf, vf = torch.randn_like(qf), torch.randn_like(qf)
        with sdpa_kernel(backend):
            flash = _time(lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), device, reps)
        rows.append({"kernel": "varlen_prefill", "sequences": seqs, "length": length, "ms": paged * 1e3,
                     "sdpa_flash_ms": flash * 1e3, "time_vs_flash": paged / flash})
    rows += block_linear_rows(device, dtype, smoke, reps)
    return rows


def block_linear_rows(device: str, dtype, smoke: bool, reps: int) -> list[dict]:
    """asyncllm_kernels.block_linear (Q4_1 / Q8_0 / e4m3 blocks) against torch's dense matmul of the
    same weight in the model's dtype: the blocks' bytes read per second, and the time ratio."""
    import torch

    from asyncllm.model.layers.block_quant import BlockQuantWeight
    from asyncllm_kernels import block_linear

    n, k = (64, 64) if smoke else (4096, 4096)
    weight = torch.randn(n, k) * 0.02
    rows = []
    for bits in (4, 8, 9):
        quantized = BlockQuantWeight.quantize(weight, bits)
        blocks, dense = quantized.blocks.to(device), quantized.dequantize().to(device, dtype)
        for m in ((1, 16) if smoke else (1, 16, 256)):
            x = torch.randn(m, k, dtype=dtype, device=device)
            ours = _time(lambda: block_linear(x, blocks, bits, n), device, reps)
            theirs = _time(lambda: x @ dense.t(), device, reps)
            rows.append({"kernel": "block_linear", "bits": bits, "rows": m, "n": n, "k": k, "ms": ours * 1e3,
                         "dense_matmul_ms": theirs * 1e3, "GB_per_s": blocks.numel() / ours / 1e9,
                         "time_vs_dense": ours / theirs})
    return rows


def _generate(llm, prompts: list[list[int]], max_tokens: int):
    from asyncllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs, time.perf_counter() - started


def engine(path: str, device: str, smoke: bool, graphs: bool) -> dict:
    """Single stream, W1 and W2-shaped offline throughput on the Triton kernels in bf16."""
    from asyncllm import LLM

    dtype = "bfloat16" if device == "cuda" else "float32"
    llm = LLM(path, dtype=dtype, device=device, kernels="triton", enforce_eager=not graphs,
              kv_cache_memory=None if device == "cuda" else 64 << 20, gpu_memory_utilization=0.5,
              max_num_seqs=256 if not smoke else 8, max_num_batched_tokens=8192 if not smoke else 64)
    try:
        runner = llm.engine.core.executor.worker.runner
        if graphs and runner.decode_graphs is None:  # no CUDA: the graphs' padded buffers, run eagerly
            runner.enable_decode_graphs([1, 2, 4, 8], capture=False)
        vocab = llm.engine.core.checkpoint.config.vocab_size
        single_out = 8 if smoke else 256
        _generate(llm, _prompts(1, [16], vocab, 0), 4)  # warm-up (Triton compiles)
        outs, _ = _generate(llm, _prompts(1, [16 if smoke else 128], vocab, 2), single_out)
        m = outs[0].metrics
        single = (single_out - 1) / (m.last_token_time - m.first_token_time)
        n1, in1, out1 = (4, 16, 4) if smoke else (64, 128, 128)
        _, seconds = _generate(llm, _prompts(n1, [in1], vocab, 3), out1)
        w1 = n1 * out1 / seconds
        n2, out2 = (6, 4) if smoke else (256, 128)
        lengths = [24, 9, 30] if smoke else [32, 64, 128, 256, 512]
        _, seconds = _generate(llm, _prompts(n2, lengths, vocab, 4), out2)
        w2 = n2 * out2 / seconds
        replays = runner.decode_graphs.replays if runner.decode_graphs is not None else 0
    finally:
        llm.engine.shutdown()
        _free(device)
    return {"dtype": dtype, "cuda_graphs": graphs, "single_stream_decode_tok_s": single, "w1_tok_s": w1,
            "w2_offline_tok_s": w2, "graph_replays": replays}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="the JSON written after each part")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU test of this script)")
    parser.add_argument("--tokenizer", default=os.environ.get("ASYNCLLM_TEST_TOKENIZER"),
                        help="a HF tokenizer folder (default: the default model's, saved)")
    parser.add_argument("--parts", default="parity,kernels,engine")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"machine": machine(), "device": device, "smoke": args.smoke}

    def write():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from asyncllm.model.default_model import default_model_path
            from asyncllm.model.tokenizer import load_gguf_tokenizer

            tokenizer = os.path.join(tmp, "tokenizer")
            load_gguf_tokenizer(default_model_path()).save_pretrained(tokenizer)
        shapes = ["tiny"] if args.smoke else ["smollm2-135m-shape", "llama-3.2-1b-shape"]
        folders = {}

        def folder(shape):
            if shape not in folders:
                folders[shape] = save_random_model(shape, os.path.join(tmp, shape), tokenizer)
            return folders[shape]

        if "parity" in parts:
            started = time.perf_counter()
            result["parity"] = {shapes[0]: parity(folder(shapes[0]), device, args.smoke)}
            print(f"parity ({time.perf_counter() - started:.0f}s):", json.dumps(result["parity"]), flush=True)
            write()
        if "kernels" in parts:
            result["kernels"] = kernels(device, args.smoke)
            for row in result["kernels"]:
                print(json.dumps(row), flush=True)
            write()
        if "engine" in parts:
            result["engine"] = {}
            for shape in shapes:
                rows = [engine(folder(shape), device, args.smoke, graphs) for graphs in (True, False)]
                with_graphs, eager = rows
                ratios = {k: with_graphs[k] / eager[k] for k in ("single_stream_decode_tok_s", "w1_tok_s",
                                                                 "w2_offline_tok_s")}
                result["engine"][shape] = {"graphs": with_graphs, "eager": eager, "graphs_over_eager": ratios}
                print(shape, json.dumps(result["engine"][shape]), flush=True)
                write()
    result["median_decode_bandwidth_vs_flash"] = statistics.median(
        r["bandwidth_vs_flash"] for r in result.get("kernels", []) if r["kernel"] == "paged_decode") \
        if "kernels" in result else None
    write()
    return result


if __name__ == "__main__":
    main()
