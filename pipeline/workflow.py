"""Whole runs: data -> preprocessing -> kernel -> KIP -> DistilledSet, and scoring one.

These are the functions the CLI and the DVC stages call; they take config records and paths they
are given, and never read params files themselves.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline import evaluate as scoring
from pipeline import kernels, kip, preprocess
from pipeline.artifacts import DistilledSet
from pipeline.config import DataConfig, DistillConfig, EvaluateConfig, KernelConfig, PreprocessConfig
from pipeline.data import Dataset, load_dataset
from pipeline.errors import UserError

MONITOR_TEST_IMAGES = 2000


def distill(
    data: DataConfig,
    prep: PreprocessConfig,
    kernel: KernelConfig,
    config: DistillConfig,
    *,
    cache_dir: Path,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> tuple[DistilledSet, list[dict[str, float]]]:
    """Distil a support set; returns it with the per-step history (loss, monitored accuracy)."""
    dataset = load_dataset(data, cache_dir)
    transform = preprocess.fit(prep, dataset.x_train)
    x_train = transform.apply(dataset.x_train)
    kernel_fn = kernels.make(kernel)

    monitor = None
    if config.eval_every:
        # Monitoring only: the result is the last step's support, never one picked on test data.
        x_mon = transform.apply(dataset.x_test[:MONITOR_TEST_IMAGES])
        y_mon = dataset.y_test[:MONITOR_TEST_IMAGES]

        def monitor(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            scores = scoring.krr_scores(kernel_fn, images, labels, x_mon, y_mon, dataset.num_classes, config.reg)
            return {"monitor_accuracy": scores["accuracy"]}

    configs = {"data": asdict(data), "preprocess": asdict(prep), "kernel": asdict(kernel), "distill": asdict(config)}
    key = hashlib.sha256(json.dumps({**configs, "fingerprint": dataset.fingerprint}, sort_keys=True).encode()).hexdigest()
    if config.method == "label_solve":
        result = kip.label_solve(x_train, dataset.y_train, dataset.num_classes, kernel_fn, config)
    else:
        result = kip.distill(
            x_train, dataset.y_train, dataset.num_classes, kernel_fn, config,
            checkpoint=checkpoint, checkpoint_key=key, monitor=monitor, progress=progress,
        )
    metadata: dict[str, Any] = {
        **configs,
        "dataset": dataset.describe(),
        "params_hash": key,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "code_version": pipeline.__version__,
        "versions": _library_versions(),
    }
    distilled = DistilledSet(result.images, result.labels, result.classes.astype(np.int32), transform, metadata)
    return distilled, result.history


def evaluate(distilled: DistilledSet, config: EvaluateConfig, *, cache_dir: Path) -> dict[str, float]:
    """KRR test accuracy/MSE of the support set and of random real subsets of the same size."""
    data = DataConfig(**distilled.metadata["data"])
    kernel = KernelConfig(**distilled.metadata["kernel"])
    dataset = load_dataset(data, cache_dir)
    expected = distilled.metadata["dataset"]["fingerprint"]
    if dataset.fingerprint != expected:
        raise UserError(
            f"dataset {data.source}:{data.name} has fingerprint {dataset.fingerprint[:12]}, but the support set was "
            f"distilled from {expected[:12]}; expected the same data"
        )
    _check_shape(distilled, dataset)
    x_test = distilled.transform.apply(dataset.x_test)
    kernel_fn = kernels.make(kernel)
    scores = scoring.krr_scores(
        kernel_fn, distilled.images, distilled.labels, x_test, dataset.y_test,
        dataset.num_classes, config.reg, config.batch_size,
    )
    per_class = len(distilled.images) // dataset.num_classes
    baseline = scoring.random_subset_baseline(
        kernel_fn, distilled.transform.apply(dataset.x_train), dataset.y_train, x_test, dataset.y_test,
        dataset.num_classes, per_class, config.reg, config.baseline_repeats, config.seed, config.batch_size,
    )
    return {
        "krr_test_accuracy": scores["accuracy"],
        "krr_test_mse": scores["mse"],
        "baseline_test_accuracy": baseline["accuracy"],
        "baseline_test_accuracy_std": baseline["accuracy_std"],
        "baseline_test_mse": baseline["mse"],
        "support_size": int(len(distilled.images)),
        "test_size": int(len(dataset.y_test)),
    }


def _check_shape(distilled: DistilledSet, dataset: Dataset) -> None:
    if tuple(distilled.images.shape[1:]) != dataset.image_shape:
        raise UserError(
            f"support images have shape {tuple(distilled.images.shape[1:])}; the dataset's are {dataset.image_shape}"
        )


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("jax", "neural-tangents", "optax", "numpy")}
