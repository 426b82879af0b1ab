"""The benchmark scripts run (tiny sizes); their real figures are in README, not asserted here."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    import sys

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    if name == "common":  # the very module the scripts import, so patching it reaches them
        return importlib.import_module("common")
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_structured_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("structured").main(["--batch", "2", "--max-tokens", "8"])
    assert [r["run"] for r in result["rows"]] == ["free", "json_schema", "lark_grammar"]
    assert all(r["tok_per_s"] > 0 for r in result["rows"])


def test_throughput_and_latency_benchmarks_run(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    w1 = _load("throughput").main(["--num-prompts", "2", "--input-len", "16", "--output-len", "4",
                                   "--skip-transformers", "--agreement-with", "float32"])
    assert w1["asyncllm_tok_per_s"] > 0 and w1["fp32_gflops"] > 0 and w1["peak_gflops"] > 0
    # fp32 against a second fp32 engine: batch-invariant, so every greedy output is the same
    assert w1["agreement"] == {"dtype": "float32", "identical": 2, "of": 2, "mean_first_difference": 4}
    lat = _load("latency").main(["--lengths", "32,64", "--output-len", "4", "--skip-transformers"])
    assert lat["decode_tok_per_s"] > 0 and set(lat["ttft"]) == {32, 64}
    assert lat["prefix_hit_s"] > 0 and lat["prefix_miss_s"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"throughput.json", "latency.json"}


def test_serving_benchmark_runs_against_its_own_server(tmp_path, monkeypatch):
    """W2 at a tiny size: starts `asyncllm serve` on port 0, streams with the openai client, stops it by pid."""
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    w2 = _load("serving").main(["--num-requests", "3", "--concurrency", "2", "--input-len", "16",
                                "--max-tokens", "4", "--skip-transformers",
                                "--server-args", "--max-num-batched-tokens 24"])
    assert w2["output_tokens"] == 3 * 4 and w2["tok_per_s"] > 0
    assert w2["ttft_p50_ms"] > 0 and w2["itl_p50_ms"] > 0
    assert (tmp_path / "serving.json").exists()


def test_dtype_parity_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("dtype_parity").main(["--variants", "float32,float32+int4", "--prompts", "2", "--max-tokens", "4",
                                         "--max-num-seqs", "1", "--output", "parity_one_at_a_time"])
    fp32, int4 = result["rows"]
    assert fp32["greedy_identical"] == "2/2" and fp32["logprob_abs_diff_max"] < 2e-3
    assert int4["variant"] == "float32+int4" and int4["logprob_abs_diff_max"] < 1.0
    assert (tmp_path / "parity_one_at_a_time.json").exists()


def test_embeddings_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("embeddings").main(["--num-texts", "8", "--tokens", "32", "--rounds", "1"])
    assert [r["engine"] for r in result["rows"]] == ["asyncllm", "sentence-transformers"]
    assert result["min_cosine"] > 0.9999 and all(r["texts_per_s"] > 0 for r in result["rows"])


def test_beam_search_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("beam_search").main(["--num-prompts", "1", "--beam-width", "2", "--max-tokens", "4",
                                        "--skip-transformers"])
    assert result["rows"][0]["prompts_per_s"] > 0


def test_speculative_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("speculative").main(["--num-prompts", "1", "--max-tokens", "8"])
    assert {(r["method"], r["workload"]) for r in result["rows"]} == {
        (m, w) for m in ("plain", "ngram", "suffix", "draft_model int8") for w in ("copy", "free")}
    assert all(r["same_tokens"] for r in result["rows"])


def test_lora_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("lora").main(["--batch", "2", "--adapters", "2", "--rank", "4", "--input-len", "16",
                                 "--max-tokens", "4", "--dtypes", "float32", "--repeats", "1"])
    assert [r["case"] for r in result["rows"]][:4] == ["batch 2, base", "batch 2, 2 adapters",
                                                         "single stream, base", "single stream, 1 adapter"]
    assert all(r["decode_tok_per_s"] > 0 for r in result["rows"]) and result["load_ms"] > 0


def test_tp_collectives_benchmark_runs_its_two_ranks(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("tp_collectives").main(["--skip-model", "--repeats", "20"])
    assert set(result["collective_us"]) == {f"{c}: {what}" for c in ("gloo", "shm")
                                           for what, _ in _load("tp_collectives").SIZES}
    assert all(v > 0 for v in result["collective_us"].values())


def test_parallelism_benchmark_runs(tmp_path, monkeypatch):
    """The pipeline split (the data split differs only in the option it sets)."""
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("parallelism").main(["--split", "pipeline", "--rounds", "1", "--num-prompts", "4",
                                        "--input-len", "16", "--output-len", "4"])
    assert [r["pipeline_parallel_size"] for r in result["rows"]] == [1, 2]
    assert all(r["output tok/s"] > 0 and r["single stream tok/s"] > 0 for r in result["rows"])
    assert (tmp_path / "pipeline_parallel.json").exists()


def test_gpu_bench_runs_on_tiny_shapes(tmp_path):
    """make gpu-check's measurements (benchmarks/gpu_bench.py) at tiny sizes on this device: the
    parity part checks fp32 ids against transformers, the engine part runs with the graphs'
    padded buffers (eagerly without CUDA) and without."""
    import json

    out = tmp_path / "gpu_bench.json"
    result = _load("gpu_bench").main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["parity"] == result["parity"]
    fp32 = result["parity"]["tiny"]["float32"]
    assert fp32["greedy_equal"] == fp32["prompts"] == 2 and fp32["max_abs_logprob_diff"] < 1e-3
    assert {r["kernel"] for r in result["kernels"]} == {"paged_decode", "varlen_prefill", "block_linear"}
    assert all(r["ms"] > 0 and (r.get("sdpa_flash_ms") or r["dense_matmul_ms"]) > 0 for r in result["kernels"])
    tiny = result["engine"]["tiny"]
    assert tiny["graphs"]["graph_replays"] > 0 and tiny["eager"]["graph_replays"] == 0
    assert all(tiny[run][k] > 0 for run in ("graphs", "eager") for k in ("single_stream_decode_tok_s", "w1_tok_s",
                                                                         "w2_offline_tok_s"))
