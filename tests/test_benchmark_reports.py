"""Published benchmark numbers are the saved JSON's, and the JSON was taken on a quiet machine.

docs/scaling.md's step tables are `benchmarks/kip_step.py --table` of the committed JSON, line for
line (and its ConvNet evaluation-kernel tables `benchmarks/conv_eval_kernel.py --table`), so the prose cannot drift from the measurement; and that JSON must show, per sample, the
load it was taken under, with no timing flagged as loaded.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "kip_step.json"


def _benchmark_module(name: str = "kip_step"):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_scaling_doc_tables_are_the_saved_benchmark():
    report = json.loads(RESULT.read_text())
    table = _benchmark_module().table(report)
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            assert line in doc, f"docs/scaling.md lacks the benchmark's line: {line}"


def test_conv_evaluation_kernel_tables_are_the_saved_benchmark():
    report = json.loads((ROOT / "benchmarks" / "results" / "conv_eval_kernel.json").read_text())
    assert report["split"].startswith("validation")
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for line in _benchmark_module("conv_eval_kernel").table(report).splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            assert line in doc, f"docs/scaling.md lacks the benchmark's line: {line}"


def test_saved_step_timings_were_taken_quiet_and_say_so():
    report = json.loads(RESULT.read_text())
    assert report["loaded"] == []
    for row in report["steps"]:
        for name in ("ours", "reference", "floor"):
            timing = row[name]
            assert not timing["loaded"] and timing["quiet_samples"] >= 5
            assert all("other_cores" in sample for sample in timing["samples"])
            assert timing["p25_ms"] <= timing["median_ms"] <= timing["p75_ms"]
