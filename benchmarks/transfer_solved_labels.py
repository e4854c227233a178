"""Networks on the support's own labels, or on labels solved for each network's own kernel?

For each support file given (e.g. the paper matrix's results/supports/<cell>/kip_labels.npz) and for
class-balanced random real subsets of the same size, width-1024 FC networks are trained exactly as
the matrix's `networks` stages train them (`transfer.train_networks` / `train_baseline_networks`),
twice:

    support     train.labels=support, labels_choice=fixed (the matrix's setting so far)
    validation  train.labels_choice=validation: the same candidates on the support's labels and on
                labels solved for the network's own NTK (pipeline/kernels/network_kernel.py), chosen jointly
                with label scale and optimizer on the validation split

Each side's settings are chosen on the validation split only; the test split is scored once per
network (3 seeds). Writes JSON lines (--out), one per (set, mode), resumable: finished lines are kept.

With --diagnose, one more line per support says why: validation accuracy of kernel regression on
the support with the infinite-width kernel the support was distilled for, with the empirical NTK
of the first seed's width-1024 network on the support's own labels (what that network converges to
in the kernel regime), and with the same network's NTK on the labels solved for it.

With --ceiling, one more line per support says how far label solving alone can go: the same
network's kernel regression on validation, with labels solved on 10,000, 30,000 or as many
class-balanced training images as there are (48,210 on MNIST) and a solve ridge of 1e-6, 1e-4 or
1e-2 (relative to the gram's mean diagonal).

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

from pipeline.artifacts import npz as artifacts
from pipeline.data.prepared import reprepare
from pipeline.evaluate import finite, transfer
from pipeline.kernels import functions as kernels, network_kernel
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import KernelConfig, TrainConfig

MODES = {"support": {"labels": "support", "labels_choice": "fixed"},
         "validation": {"labels": "support", "labels_choice": "validation"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("supports", type=Path, nargs="+")
    parser.add_argument("--random", action="store_true", help="also random real subsets of each support's size")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--diagnose", action="store_true", help="also the kernel-regression diagnosis per support")
    parser.add_argument("--ceiling", action="store_true", help="also label solving's ceiling per support (targets x ridge)")
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
        if args.ceiling and (str(path), "ceiling") not in done:
            row = {"set": str(path), "sha256": digest, "mode": "ceiling", "krr_val_network_ntk": ceiling(support, prepared)}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        for name, is_random in sets:
            for mode in filter(None, args.modes.split(",")):  # --modes "": the extra lines only
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


def _network_regression(support, prepared):
    """(config, params, predict): the first seed's network (TrainConfig defaults, seed 0) and
    labels -> its kernel regression's validation accuracy (ridge 1e-6 of the mean diagonal)."""
    config = dataclasses.replace(TrainConfig(), labels="solved")
    _, params, _ = finite._init(config, support.images.shape[1:], prepared.num_classes, config.seed * 1000)
    n, k = len(support.images), prepared.num_classes
    k_ss = network_kernel.empirical_ntk(config, params, support.images, support.images).transpose(0, 2, 1, 3).reshape(n * k, n * k)
    inverse = np.linalg.inv(k_ss + 1e-6 * np.trace(k_ss) / len(k_ss) * np.eye(len(k_ss)))
    blocks = [(network_kernel.empirical_ntk(config, params, prepared.x_val[i:i + 1000], support.images)
               .transpose(0, 2, 1, 3).reshape(-1, n * k) @ inverse, prepared.y_val[i:i + 1000])
              for i in range(0, len(prepared.y_val), 1000)]

    def accuracy(labels: np.ndarray) -> float:
        flat = np.asarray(labels, np.float64).reshape(-1)
        return sum(int(np.sum((m @ flat).reshape(-1, k).argmax(1) == y)) for m, y in blocks) / len(prepared.y_val)
    return config, params, accuracy


def ceiling(support, prepared) -> list[dict]:
    """Validation accuracy of the first seed's network's kernel regression on labels solved with
    more targets or a larger ridge than the defaults (10,000 targets, ridge 1e-6)."""
    config, params, accuracy = _network_regression(support, prepared)
    rows = []
    for targets in (10_000, 30_000, len(prepared.y_train)):  # the last: as many as class balance allows
        for reg in (1e-6, 1e-4, 1e-2):
            solve_config = dataclasses.replace(config, solve_targets=targets, solve_reg=reg)
            x_t, y_t = transfer.solve_targets(prepared, solve_config)
            labels = network_kernel.solve_labels(solve_config, params, support.images, x_t, y_t, prepared.num_classes, reg)
            rows.append({"solve_targets": len(y_t), "solve_reg": reg, "val_accuracy": accuracy(labels)})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def diagnose(support, prepared) -> dict:
    """Validation accuracy of KRR on the support: infinite kernel; the network's NTK (support labels,
    then solved labels). The network is the first seed's (TrainConfig defaults, seed 0)."""
    config, params, accuracy = _network_regression(support, prepared)
    solved = network_kernel.solve_labels(config, params, support.images, *transfer.solve_targets(prepared, config),
                                         prepared.num_classes, config.solve_reg)
    correct = {"support": accuracy(support.labels), "solved": accuracy(solved)}
    k = prepared.num_classes
    kernel_fn = kernels.make(KernelConfig(**support.metadata["kernel"]))
    from pipeline.evaluate import scoring

    infinite = scoring.krr_scores(kernel_fn, support.images, support.labels, prepared.x_val, prepared.y_val, k,
                                  support.metadata["distill"]["reg"])["accuracy"]
    return {"krr_val_infinite_kernel": infinite,
            "krr_val_network_ntk_support_labels": correct["support"],
            "krr_val_network_ntk_solved_labels": correct["solved"]}


if __name__ == "__main__":
    sys.exit(main())
