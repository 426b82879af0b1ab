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
    spec.loader.exec_module(module)
    return module


def test_structured_benchmark_runs(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = _load("structured").main(["--batch", "2", "--max-tokens", "8"])
    assert [r["run"] for r in result["rows"]] == ["free", "json_schema"]
    assert all(r["tok_per_s"] > 0 for r in result["rows"])


def test_throughput_and_latency_benchmarks_run(tmp_path, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    w1 = _load("throughput").main(["--num-prompts", "2", "--input-len", "16", "--output-len", "4",
                                   "--skip-transformers"])
    assert w1["asyncllm_tok_per_s"] > 0 and w1["fp32_gflops"] > 0
    lat = _load("latency").main(["--lengths", "32,64", "--output-len", "4", "--skip-transformers"])
    assert lat["decode_tok_per_s"] > 0 and set(lat["ttft"]) == {32, 64}
    assert lat["prefix_hit_s"] > 0 and lat["prefix_miss_s"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"throughput.json", "latency.json"}
