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


def test_the_gpu_benchmark_runs_on_the_cpu_with_the_core_only():
    """benchmarks/gpu.py --device cpu --small --accuracy: every row measured, the time-to-accuracy run
    takes the matrix cell's settings, and nothing beyond the core is imported (it must run on a bare
    accelerator image: no neural-tangents, TensorFlow, DVC, MLflow or cryptography)."""
    import os
    import subprocess

    import yaml

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--small", "--repeats", "1",
                           "--accuracy"], capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["backend"] == "cpu" and report["small"] is True
    assert report["imported"] == {"neural_tangents": False, "tensorflow": False, "dvc": False, "mlflow": False,
                                  "cryptography": False}
    timed = report["time_to_accuracy"]
    matrix = yaml.safe_load((ROOT / "experiments" / "paper" / "params.yaml").read_text())
    cell = matrix["cells"]["mnist-conv_rf-10"]
    for name in ("loss", "lr_schedule", "learning_rate", "keep"):  # the matrix's settings, small sizes aside
        assert timed["distill"][name] == cell["kip_labels"][name]
    assert timed["distill"]["learn_labels"] is True and timed["kernel"]["architecture"] == "conv_rf"
    assert timed["kip_wall_seconds"] > 0 and 0 <= timed["krr_test_accuracy"] <= 1 and timed["test_images"] == 360
    assert [h["step"] for h in timed["validation_curve"]] == [0, 2, 4] and timed["kept_step"] in (0, 2, 4)
    assert all(report["matmul"][p]["gflops"] > 0 for p in ("default", "highest"))
    assert [(r["support"], r["targets"]) for r in report["fc_step"]] == [(20, 200), (10, 400)]
    assert all(r["median_ms"] > 0 and 0 < r["share_of_fp32_matmul"] for r in report["fc_step"])
    assert report["conv_rf_step"]["median_ms"] > 0


def test_the_gpu_benchmark_without_a_gpu_says_so_in_one_line():
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "gpu", "--small", "--no-cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("gpu.py: --device gpu: JAX finds no such device"), done.stderr[-1500:]
