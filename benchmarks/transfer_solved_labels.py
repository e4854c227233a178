"""Networks on the support's own labels, or on labels solved for each network's own kernel?

For each support file given (e.g. the paper matrix's results/supports/<cell>/kip_labels.npz) and for
class-balanced random real subsets of the same size, width-1024 FC networks are trained exactly as
the matrix's `networks` stages train them (`transfer.train_networks` / `train_baseline_networks`),
twice:

    support     train.labels=support, labels_choice=fixed (the matrix's setting so far)
    validation  train.labels_choice=validation: the same candidates on the support's labels and on
                labels solved for the network's own NTK (pipeline/network_kernel.py), chosen jointly
                with label scale and optimizer on the validation split

Each side's settings are chosen on the validation split only; the test split is scored once per
network (3 seeds). Writes JSON lines (--out), one per (set, mode), resumable: finished lines are kept.

With --diagnose, one more line per support says why: validation accuracy of kernel regression on
the support with the infinite-width kernel the support was distilled for, with the empirical NTK
of the first seed's width-1024 network on the support's own labels (what that network converges to
in the kernel regime), and with the same network's NTK on the labels solved for it.

    python benchmarks/transfer_solved_labels.py SUPPORT.npz [...] [--random] --out FILE.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import artifacts, finite, kernels, network_kernel, transfer
from pipeline.cli import default_cache_dir
from pipeline.config import KernelConfig, TrainConfig
from pipeline.prepared import reprepare

MODES = {"support": {"labels": "support", "labels_choice": "fixed"},
         "validation": {"labels": "support", "labels_choice": "validation"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("supports", type=Path, nargs="+")
    parser.add_argument("--random", action="store_true", help="also random real subsets of each support's size")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--diagnose", action="store_true", help="also the kernel-regression diagnosis per support")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    done = set()
    if args.out.exists():
        done = {(r["set"], r["mode"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for path in args.supports:
        support = artifacts.load_npz(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()  # which support file, whatever its path
        prepared = reprepare(support, cache_dir=default_cache_dir())
        per_class = len(support.images) // prepared.num_classes
        sets = [(str(path), False)] + ([(f"random{per_class}:{support.metadata['data']['name']}", True)]
                                       if args.random else [])
        if args.diagnose and (str(path), "diagnosis") not in done:
            row = {"set": str(path), "sha256": digest, "mode": "diagnosis", **diagnose(support, prepared)}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        for name, is_random in sets:
            for mode in args.modes.split(","):
                if (name, mode) in done:
                    continue
                config = dataclasses.replace(TrainConfig(), eval_every=0, **MODES[mode])
                started = time.process_time()
                if is_random:
                    runs = transfer.train_baseline_networks(prepared, per_class, config, progress=False)
                    results, settings = runs["baseline"], runs["settings"]
                else:
                    runs = transfer.train_networks(support, prepared, config, baseline=False, progress=False)
                    results, settings = runs["distilled"], runs["settings"]["distilled"]
                accuracy = [r.accuracy for r in results]
                row = {"set": name, "sha256": None if is_random else digest, "mode": mode, "settings": settings, "test_accuracy": accuracy,
                       "mean": float(np.mean(accuracy)), "std": float(np.std(accuracy)),
                       "cpu_seconds": round(time.process_time() - started, 1)}
                print(json.dumps(row), flush=True)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                done.add((name, mode))
    return 0


def diagnose(support, prepared) -> dict:
    """Validation accuracy of KRR on the support: infinite kernel; the network's NTK (support labels,
    then solved labels). The network is the first seed's (TrainConfig defaults, seed 0)."""
    config = dataclasses.replace(TrainConfig(), labels="solved")
    seed = config.seed * 1000
    _, params, _ = finite._init(config, support.images.shape[1:], prepared.num_classes, seed)
    solved = finite.solved_labels(support.images, prepared.num_classes, config, seed, transfer.solve_targets(prepared, config))
    n, k = len(support.images), prepared.num_classes
    k_ss = network_kernel.empirical_ntk(config, params, support.images, support.images).transpose(0, 2, 1, 3).reshape(n * k, n * k)
    inverse = np.linalg.inv(k_ss + 1e-6 * np.trace(k_ss) / len(k_ss) * np.eye(len(k_ss)))
    correct = {"support": 0, "solved": 0}
    for start in range(0, len(prepared.y_val), 1000):
        x = prepared.x_val[start:start + 1000]
        k_vs = network_kernel.empirical_ntk(config, params, x, support.images).transpose(0, 2, 1, 3).reshape(len(x) * k, n * k)
        for name, labels in (("support", support.labels), ("solved", solved)):
            predicted = (k_vs @ inverse @ np.asarray(labels, np.float64).reshape(-1)).reshape(len(x), k)
            correct[name] += int(np.sum(predicted.argmax(1) == prepared.y_val[start:start + 1000]))
    kernel_fn = kernels.make(KernelConfig(**support.metadata["kernel"]))
    from pipeline import evaluate as scoring

    infinite = scoring.krr_scores(kernel_fn, support.images, support.labels, prepared.x_val, prepared.y_val, k,
                                  support.metadata["distill"]["reg"])["accuracy"]
    return {"krr_val_infinite_kernel": infinite,
            "krr_val_network_ntk_support_labels": correct["support"] / len(prepared.y_val),
            "krr_val_network_ntk_solved_labels": correct["solved"] / len(prepared.y_val)}


if __name__ == "__main__":
    sys.exit(main())
