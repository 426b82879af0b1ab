"""Tensor-parallel communication on one host: the latency of one all-reduce (and the logits'
all-gather) at TP=2 through gloo and through the shared-memory collectives, for the sizes of a
decode step, and the tokens/s of Gemma 3 270M (or --model) at TP=1 and TP=2 with each.

    python benchmarks/tp_collectives.py [--model gemma3-270m] [--skip-model]

The latency part runs two ranks as two processes of this script (`--rank`), joined as the
engine's workers are (torch.distributed gloo, file rendezvous; the same shared file layout).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import publish, resolve_model  # noqa: E402

# (what, floats): one token's hidden state of Gemma 3 270M, 8 and 64 tokens of it, and the
# logits slice one rank gathers for one token of its 262,144-token vocabulary.
SIZES = [("hidden, 1 token", 640), ("hidden, 8 tokens", 8 * 640), ("hidden, 64 tokens", 64 * 640),
         ("logits slice, 1 token", 131072)]


def rank_main(rank: int, rendezvous: str, out: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from asyncllm.model.shm_collectives import ShmCollectives, shm_path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    path = shm_path(os.path.dirname(rendezvous))
    shm = ShmCollectives(path, rank, 2, create=True) if rank == 0 else None
    dist.barrier()
    shm = shm or ShmCollectives(path, rank, 2)
    results = {}
    for what, floats in SIZES:
        x = torch.randn(floats)
        for name, op in (("gloo", lambda t: dist.all_reduce(t)), ("shm", shm.all_reduce)):
            for _ in range(20):
                op(x)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                op(x)
            results[f"{name}: {what}"] = (time.perf_counter() - start) / repeats * 1e6
    dist.barrier()
    if rank == 0:
        os.unlink(path)
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def collective_latencies(repeats: int) -> dict[str, float]:
    folder = tempfile.mkdtemp(prefix="asyncllm-tp-bench-")
    rendezvous, out = os.path.join(folder, "rendezvous"), os.path.join(folder, "out.json")
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--rendezvous", rendezvous, "--out", out,
                               "--repeats", str(repeats)]) for r in range(2)]
    for proc in procs:
        proc.wait(timeout=600)
    with open(out) as f:
        return json.load(f)


def model_speeds(model: str) -> list[dict]:
    from asyncllm import LLM, SamplingParams

    prompts = ["The history of the printing press", "def quicksort(items):", "In the deep ocean,", "Paris is",
               "A recipe for bread:", "The theory of relativity", "Once upon a time", "import numpy as np"]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    rows, reference = [], None
    for tp, collectives in ((1, "-"), (2, "gloo"), (2, "shm")):
        os.environ["ASYNCLLM_SHM_COLLECTIVES"] = "0" if collectives == "gloo" else "1"
        llm = LLM(model, dtype="float32", kv_cache_memory=128 << 20, tensor_parallel_size=tp)
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        llm.generate(prompts[:1], params, use_tqdm=False)
        single = 64 / (time.perf_counter() - start)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        batch = 8 * 64 / (time.perf_counter() - start)
        tokens = [o.outputs[0].token_ids for o in outs]
        reference = reference or tokens
        rows.append({"system": f"TP={tp} ({collectives})", "one_stream_tok_s": single, "eight_streams_tok_s": batch,
                     "same_tokens_as_tp1": sum(a == b for a, b in zip(tokens, reference))})
        llm.engine.shutdown()
    os.environ.pop("ASYNCLLM_SHM_COLLECTIVES", None)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.rendezvous, args.out, args.repeats)
        return {}
    latencies = collective_latencies(args.repeats)
    payload: dict = {"collective_us": latencies}
    if not args.skip_model:
        payload["model"] = model_speeds(resolve_model(args.model))
        publish("Decode speed at TP=1 and TP=2 on one host", payload["model"], "tp_collectives", payload)
    publish("One all-reduce at TP=2 on one host (microseconds)",
            [{"collective": k, "microseconds": v} for k, v in latencies.items()], "tp_collectives", payload)
    return payload


if __name__ == "__main__":
    main()
