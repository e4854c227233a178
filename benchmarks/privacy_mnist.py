"""Corrupted supports still work (KIP paper, Sec. 5): 100 MNIST images, FC NTK kernel.

Compares clean KIP (real-image init) with KIP initialised from noise with 90 % of every image's
pixels replaced by noise and never learned; both 4000 steps with learned labels. For each: KRR test
accuracy on the full 10k test set,
and the distance from each support image to its nearest training image (median, min) beside the
same statistic for held-out real images. Prints JSON (and writes it with --out).

    python benchmarks/privacy_mnist.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _report import emit

from pipeline.data.prepared import prepare
from pipeline.run import workflow
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, DistillConfig, EvaluateConfig, KernelConfig, PreprocessConfig

RUNS = {
    "clean": DistillConfig(learn_labels=True, steps=4000, checkpoint_every=0),
    "noise_init_90pct_corrupted": DistillConfig(init="noise", corruption=0.9, learn_labels=True, steps=4000, checkpoint_every=0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    prepared = prepare(DataConfig("registry", "mnist"), PreprocessConfig("standardize"), cache_dir=default_cache_dir())
    kernel = KernelConfig()
    results = []
    for name, config in RUNS.items():
        t0 = time.perf_counter()
        distilled = workflow.distill(prepared, kernel, config, progress=False).distilled
        metrics = workflow.evaluate(distilled, prepared, EvaluateConfig(baseline_repeats=3))
        section = distilled.metadata["privacy"]
        row = {
            "run": name,
            "krr_test_accuracy": metrics["krr_test_accuracy"],
            "random_subset_test_accuracy": metrics["baseline_test_accuracy"],
            "nn_distance_support": section["support"],
            "nn_distance_real_heldout_images": section["real_heldout_images"],
            "median_ratio": section["median_ratio"],
            "seconds": round(time.perf_counter() - t0, 1),
            "distill": asdict(config),
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    emit({"benchmark": "privacy_mnist", "kernel": asdict(kernel), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
