"""The benchmark scripts run (tiny sizes); their real figures are in README, not asserted here."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
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
