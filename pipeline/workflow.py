"""Whole runs after `pipeline.prepared.prepare`; the DVC stages and the CLI share them:

    distill(prepared, kernel, distill) -> run    KIP (or Label Solve) on the prepared training split
    evaluate(set, prepared, evaluate) -> metrics KRR on the prepared test split, beside random subsets
    transfer(set, prepared, train) -> metrics    finite networks trained on the set, beside random subsets

These take config records and values; reading params files and choosing paths is the caller's job.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline import evaluate as scoring
from pipeline import kernels, kip, krr, privacy
from pipeline.artifacts import DistilledSet
from pipeline.config import DistillConfig, EvaluateConfig, KernelConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.prepared import Prepared

MONITOR_TEST_IMAGES = 2000


@dataclass(frozen=True)
class DistillRun:
    distilled: DistilledSet
    history: list[dict[str, float]]  # one record per step: step, loss (+ monitor_accuracy)
    initial_images: np.ndarray  # the support before distillation, for before/after pictures


def distill(
    prepared: Prepared,
    kernel: KernelConfig,
    config: DistillConfig,
    *,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> DistillRun:
    """Distil a support set; returns it with the per-step history and the initial images."""
    kernel_fn = kernels.make(kernel)
    monitor = None
    if config.eval_every:
        # Monitoring only: the result is the last step's support, never one picked on test data.
        x_mon = prepared.x_test[:MONITOR_TEST_IMAGES]
        y_mon = prepared.y_test[:MONITOR_TEST_IMAGES]

        def monitor(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            scores = scoring.krr_scores(
                kernel_fn, images, labels, x_mon, y_mon, prepared.num_classes, config.reg, reg_name="distill.reg"
            )
            return {"monitor_accuracy": scores["accuracy"]}

    configs = {**prepared.provenance, "kernel": asdict(kernel), "distill": asdict(config)}
    params_hash = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()
    if config.method == "label_solve":
        result = kip.label_solve(prepared.x_train, prepared.y_train, prepared.num_classes, kernel_fn, config)
    else:
        result = kip.distill(
            prepared.x_train, prepared.y_train, prepared.num_classes, kernel_fn, config,
            checkpoint=checkpoint, checkpoint_key=checkpoint_key(params_hash, prepared),
            monitor=monitor, progress=progress,
        )
    metadata: dict[str, Any] = {
        **configs,
        "params_hash": params_hash,
        "seed": config.seed,
        "steps": config.steps if config.method == "kip" else 0,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "code_version": pipeline.__version__,
        "privacy": privacy.report(
            result.images, prepared.x_train, prepared.x_test, config.seed,
            learned=~kip.corruption_mask(result.images.shape, config),
        ),
        "versions": _library_versions(),
    }
    distilled = DistilledSet(result.images, result.labels, result.classes.astype(np.int32), prepared.transform, metadata)
    return DistillRun(distilled, result.history, result.initial_images)


def evaluate(distilled: DistilledSet, prepared: Prepared, config: EvaluateConfig) -> dict[str, float]:
    """KRR test accuracy/MSE of the support set and of random real subsets of the same size."""
    if tuple(distilled.images.shape[1:]) != tuple(prepared.x_test.shape[1:]):
        raise UserError(
            f"support images have shape {tuple(distilled.images.shape[1:])}; "
            f"the test images are {tuple(prepared.x_test.shape[1:])}"
        )
    kernel_fn = kernels.make(KernelConfig(**distilled.metadata["kernel"]))
    reg = config.reg
    scores = scoring.krr_scores(
        kernel_fn, distilled.images, distilled.labels, prepared.x_test, prepared.y_test,
        prepared.num_classes, reg, config.batch_size,
    )
    per_class = max(1, len(distilled.images) // prepared.num_classes)
    baseline = scoring.random_subset_baseline(
        kernel_fn, prepared.x_train, prepared.y_train, prepared.x_test, prepared.y_test,
        prepared.num_classes, per_class, reg, config.baseline_repeats, config.seed, config.batch_size,
    )
    return {
        "krr_test_accuracy": scores["accuracy"],
        "krr_test_mse": scores["mse"],
        "baseline_test_accuracy": baseline["accuracy"],
        "baseline_test_accuracy_std": baseline["accuracy_std"],
        "baseline_test_mse": baseline["mse"],
        "support_size": int(len(distilled.images)),
        "test_size": int(len(prepared.y_test)),
    }


def transfer(distilled: DistilledSet, prepared: Prepared, config: TrainConfig) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train `config.seeds` networks on the support set and as many on class-balanced random real
    subsets of the same size (same budget), all scored on the full test split.

    Returns the metrics and the learning curve (test accuracy per eval step, mean over seeds).
    """
    runs = train_networks(distilled, prepared, config)
    distilled_acc = [r.test_accuracy for r in runs["distilled"]]
    baseline_acc = [r.test_accuracy for r in runs["baseline"]]
    metrics = {
        "nn_test_accuracy": float(np.mean(distilled_acc)),
        "nn_test_accuracy_std": float(np.std(distilled_acc)),
        "nn_train_accuracy": float(np.mean([r.train_accuracy for r in runs["distilled"]])),
        "nn_baseline_test_accuracy": float(np.mean(baseline_acc)),
        "nn_baseline_test_accuracy_std": float(np.std(baseline_acc)),
        "seeds": config.seeds,
        "support_size": int(len(distilled.images)),
        "test_size": int(len(prepared.y_test)),
    }
    curve = [
        {
            "step": point["step"],
            "distilled_test_accuracy": float(np.mean([r.curve[i]["test_accuracy"] for r in runs["distilled"]])),
            "baseline_test_accuracy": float(np.mean([r.curve[i]["test_accuracy"] for r in runs["baseline"]])),
        }
        for i, point in enumerate(runs["distilled"][0].curve)
    ]
    return metrics, curve


def train_networks(distilled: DistilledSet, prepared: Prepared, config: TrainConfig, baseline: bool = True) -> dict[str, list]:
    """The networks behind `transfer`: {"distilled": [TrainResult per seed], "baseline": [...]}
    (baseline empty unless `baseline`)."""
    from pipeline import finite

    if distilled.transform.checksum() != prepared.transform.checksum():
        raise UserError(
            "the distilled set was made with other preprocessing than the prepared test data "
            f"({distilled.transform.method} vs {prepared.transform.method}, or other fitted values); "
            "expected both from the same pipeline run"
        )
    if tuple(distilled.images.shape[1:]) != tuple(prepared.x_test.shape[1:]):
        raise UserError(
            f"distilled images have shape {tuple(distilled.images.shape[1:])} but the test images are "
            f"{tuple(prepared.x_test.shape[1:])}; expected the same shape"
        )
    per_class = max(1, len(distilled.images) // prepared.num_classes)
    runs: dict[str, list[finite.TrainResult]] = {"distilled": [], "baseline": []}
    for index in range(config.seeds):
        seed = config.seed * 1000 + index
        runs["distilled"].append(finite.train(
            distilled.images, distilled.labels, distilled.classes, prepared.x_test, prepared.y_test,
            prepared.num_classes, config, seed,
        ))
        if not baseline:
            continue
        idx = kip.class_balanced_indices(prepared.y_train, per_class, prepared.num_classes, np.random.default_rng([config.seed, 3, index]))
        runs["baseline"].append(finite.train(
            prepared.x_train[idx], np.asarray(krr.centered_one_hot(prepared.y_train[idx], prepared.num_classes)),
            prepared.y_train[idx], prepared.x_test, prepared.y_test, prepared.num_classes, config, seed,
        ))
    return runs


PACKAGE_DIR = Path(pipeline.__file__).resolve().parent


def checkpoint_key(params_hash: str, prepared: Prepared, source_dir: Path | None = None) -> str:
    """What a checkpoint must match to be resumed.

    The params, the exact training arrays (so a change of preprocessing code counts too), every
    source file of the `pipeline` package (a superset of distill's DVC deps: a changed kernel
    formula must never resume into the old result), the versions of the libraries that compute the
    step, and the devices it ran on (their count changes the reduction order, hence the bits).
    """
    import jax

    digest = hashlib.sha256(params_hash.encode())
    for array in (prepared.x_train, prepared.y_train):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(source_digest(source_dir or PACKAGE_DIR).encode())
    machine = {"versions": _library_versions(), "platform": platform.machine(),
               "devices": [d.device_kind for d in jax.devices()]}
    digest.update(json.dumps(machine, sort_keys=True).encode())
    return digest.hexdigest()


def source_digest(source_dir: Path) -> str:
    """sha256 over the relative path and bytes of every .py file under `source_dir`, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(source_dir).rglob("*.py")):
        digest.update(path.relative_to(source_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("jax", "jaxlib", "neural-tangents", "optax", "numpy", "scipy")
    return {name: version(name) for name in names}
