"""Do KIP images transfer to finite networks? (KIP paper, Sec. 4 and Table 2, FC networks.)

Distils 100 MNIST images with the pipeline's default KIP settings (FC NTK kernel, depth 1), then
trains width-1024 one-hidden-layer ReLU networks on them and, with the same budget, on class-balanced
random real subsets of 100 images; everything scored on the full 10k test set, mean ± std over seeds.
Prints JSON (and writes it with --out).

    python benchmarks/transfer_mnist.py [--seeds 5] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from _report import emit

from pipeline import workflow
from pipeline.cli import default_cache_dir
from pipeline.config import DataConfig, DistillConfig, KernelConfig, PreprocessConfig, TrainConfig
from pipeline.prepared import prepare

# The default (cross-entropy, standard parameterisation, Adam) and, for comparison, MSE on the
# KIP labels with the NTK parameterisation and SGD: the setting closest to the kernel regime.
TRAININGS = {
    "xent_standard_adam": TrainConfig(),
    "mse_ntk_sgd": TrainConfig(loss="mse", parameterization="ntk", optimizer="sgd", learning_rate=0.5),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    prepared = prepare(DataConfig("registry", "mnist"), PreprocessConfig("standardize"), cache_dir=default_cache_dir())
    kernel, distill = KernelConfig(), DistillConfig(support_per_class=10, steps=1000, checkpoint_every=0)
    distilled = workflow.distill(prepared, kernel, distill, progress=False).distilled
    results = []
    for name, config in TRAININGS.items():
        config = replace(config, seeds=args.seeds)
        t0 = time.perf_counter()
        metrics, _ = workflow.transfer(distilled, prepared, config)
        row = {"training": name, **metrics, "margin": metrics["nn_test_accuracy"] - metrics["nn_baseline_test_accuracy"],
               "seconds": round(time.perf_counter() - t0, 1), "train": asdict(config)}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "benchmark": "transfer_mnist",
        "kernel": asdict(kernel),
        "distill": asdict(distill),
        "results": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
