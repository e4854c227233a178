"""Learned-label KIP supports that width-1024 networks can use: fine-tune a KIP support against the
kernels of freshly initialised finite networks (pipeline/kernels/finite_ntk.py through the KIP engine, pipeline/distill/kip.py), then train networks on it.

Starts from a saved support (e.g. the paper matrix's results/supports/mnist-fc_ntk-10/kip_labels.npz,
identified by sha256), runs finite-width KIP on the training split with the validation split
choosing the step, saves the result (npz + Parquet, lineage in its metadata: where it started, the
finite-KIP settings, the step kept), and trains width-1024 FC networks on it exactly as the matrix's
`networks` stages do (`transfer.train_networks`, 3 seeds, label scale and optimizer chosen on
validation), twice: on the support's own labels (labels_choice fixed), and with the choice of labels
solved for each network (labels_choice validation). The test split is scored once per network.

    python benchmarks/transfer_finite_kip.py SUPPORT.npz --save benchmarks/results/supports/NAME \\
        --out benchmarks/results/transfer_finite_kip.json
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from _report import emit

from pipeline.artifacts import npz as artifacts, parquet
from pipeline.data.prepared import reprepare
from pipeline.distill import kip
from pipeline.evaluate import privacy, transfer
from pipeline.kernels import finite_ntk
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DistillConfig, TrainConfig

# The settings benchmarks/results/transfer_finite_kip.json was run with: images and labels learned,
# ridge 1e-5 relative to the mean diagonal (float32 needs more than the infinite kernel's 1e-6).
_DEFAULTS = DistillConfig(steps=1500, learning_rate=0.02, target_batch=1000, reg=1e-5, learn_labels=True,
                          eval_every=100, keep="best_validation", checkpoint_every=0)

MODES = {"support": {"labels": "support", "labels_choice": "fixed"},
         "validation": {"labels": "support", "labels_choice": "validation"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("support", type=Path)
    parser.add_argument("--save", type=Path, required=True, help="path stem of the fine-tuned support (.npz, .parquet)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps)
    parser.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate)
    parser.add_argument("--target-batch", type=int, default=_DEFAULTS.target_batch)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()

    start = artifacts.load_npz(args.support)
    prepared = reprepare(start, cache_dir=default_cache_dir())
    network = TrainConfig()  # the networks the matrix trains: width 1024, depth 1, ntk parameterisation
    config = dataclasses.replace(_DEFAULTS, steps=args.steps, learning_rate=args.learning_rate,
                                 target_batch=args.target_batch)
    kernel = finite_ntk.FiniteNetworkKernel(network, start.images.shape[1:], prepared.num_classes, config.seed)
    started = time.process_time()
    result = kip.distill(prepared.x_train, prepared.y_train, prepared.num_classes, kernel, config,
                         monitor=kernel.monitor(prepared.x_val, prepared.y_val, config.reg),
                         start=(start.images, start.labels, start.classes))
    kip_seconds = time.process_time() - started
    metadata = {
        **start.metadata,
        "finite_kip": {**dataclasses.asdict(config), "network": dataclasses.asdict(network),
                       "started_from_sha256": hashlib.sha256(args.support.read_bytes()).hexdigest(),
                       "best_step": result.best_step},
        "privacy": {**privacy.report(result.images, prepared.x_train, prepared.x_val, config.seed), "heldout_split": "validation"},
    }
    tuned = artifacts.DistilledSet(result.images, result.labels, start.classes, start.transform, metadata)
    npz, table = args.save.with_suffix(".npz"), args.save.with_suffix(".parquet")
    artifacts.save_npz(npz, tuned)
    parquet.save_parquet(table, tuned, prepared.class_names)
    tuned = artifacts.load_npz(npz)  # train on exactly what was saved

    networks = {}
    for mode in filter(None, args.modes.split(",")):
        train = dataclasses.replace(network, eval_every=0, **MODES[mode])
        t0 = time.process_time()
        runs = transfer.train_networks(tuned, prepared, train, baseline=False, progress=False)
        accuracy = [r.accuracy for r in runs["distilled"]]
        networks[mode] = {"settings": runs["settings"]["distilled"], "test_accuracy": accuracy,
                          "mean": float(np.mean(accuracy)), "std": float(np.std(accuracy)),
                          "cpu_seconds": round(time.process_time() - t0, 1)}
        print(mode, networks[mode], file=sys.stderr, flush=True)
    emit({
        "benchmark": "transfer_finite_kip",
        "started_from": str(args.support), "started_from_sha256": metadata["finite_kip"]["started_from_sha256"],
        "saved": str(npz), "saved_sha256": hashlib.sha256(npz.read_bytes()).hexdigest(),
        "finite_kip": {**dataclasses.asdict(config), "best_step": result.best_step, "cpu_seconds": round(kip_seconds, 1)},
        "validation_curve": [p for p in result.history if "val_accuracy" in p],
        "networks": networks,
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
