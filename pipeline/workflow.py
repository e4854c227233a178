"""Whole runs after `pipeline.prepared.prepare`; the DVC stages and the CLI share them:

    distill(prepared, kernel, distill) -> run    KIP (or Label Solve) on the prepared training split
    evaluate(set, prepared, evaluate) -> metrics KRR on the prepared test split, beside random subsets

Finite networks trained on a set are `pipeline.transfer`'s. These take config records and values;
reading params files and choosing paths is the caller's job.
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
from pipeline import conv_kip, distributed, kernels, kip, privacy
from pipeline.artifacts import DistilledSet
from pipeline.config import DistillConfig, EvaluateConfig, KernelConfig
from pipeline.errors import UserError
from pipeline.prepared import Prepared

@dataclass(frozen=True)
class DistillRun:
    distilled: DistilledSet
    history: list[dict[str, float]]  # one record per step: step, loss (+ val_accuracy)
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
    check_distill_settings(kernel, config)
    if distributed.process_count() > 1 and (config.method != "kip" or _random_features(kernel, config)):
        raise UserError("several processes run distill.method=kip with kernel.architecture fc|rbf|conv; "
                        f"run distill.method={config.method} with kernel.architecture={kernel.architecture} as one process")
    kernel_fn = kernels.make(kernel)
    monitor = None
    if config.eval_every and not _random_features(kernel, config):
        # The learning curve is scored on the validation split, never the test split; and the
        # result is the last step's support whatever the curve says.
        if len(prepared.y_val) == 0:
            raise UserError(
                f"distill.eval_every={config.eval_every} scores a validation split, and data.validation_fraction=0 "
                "gives none; set distill.eval_every: 0 or data.validation_fraction > 0"
            )

        def monitor(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            scores = scoring.krr_scores(
                kernel_fn, images, labels, prepared.x_val, prepared.y_val, prepared.num_classes, config.reg,
                reg_name="distill.reg",
            )
            return {"val_accuracy": scores["accuracy"]}

    configs = {**prepared.provenance, "kernel": asdict(kernel), "distill": asdict(config)}
    params_hash = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()
    extra: dict[str, Any] = {}
    if config.method == "label_solve":
        result = kip.label_solve(prepared.x_train, prepared.y_train, prepared.num_classes, kernel_fn, config)
    elif _random_features(kernel, config):
        features, loop = conv_kip.pipeline_settings(kernel, config)
        result = conv_kip.distill(
            prepared.x_train, prepared.y_train, prepared.x_val, prepared.y_val, prepared.num_classes, features, loop,
            checkpoint=checkpoint, checkpoint_key=checkpoint_key(params_hash, prepared), progress=progress,
        )
        extra = {"best_step": result.best_step, "validation_images": min(loop.val_images, len(prepared.y_val))}
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
        **extra,
        "code_version": pipeline.__version__,
        "privacy": _privacy(result.images, prepared, config),
        "versions": _library_versions(),
    }
    distilled = DistilledSet(result.images, result.labels, result.classes.astype(np.int32), prepared.transform, metadata)
    return DistillRun(distilled, result.history, result.initial_images)


def check_distill_settings(kernel: KernelConfig, config: DistillConfig) -> None:
    """Refuse kernel/distill combinations that have no meaning together (one line, UserError)."""
    if _random_features(kernel, config):
        conv_kip.pipeline_settings(kernel, config)
    elif config.loss != "mse":
        raise UserError(f"distill.loss={config.loss!r} is available with kernel.architecture=conv_rf only (not "
                        f"{kernel.architecture}); expected loss: mse")


def _random_features(kernel: KernelConfig, config: DistillConfig) -> bool:
    """conv_rf KIP draws its kernel afresh every step (`conv_kip`): its own loop, which monitors
    validation itself and keeps the best step."""
    return kernel.architecture == "conv_rf" and config.method == "kip"


def _privacy(images: np.ndarray, prepared: Prepared, config: DistillConfig) -> dict[str, Any]:
    """The privacy report; its yardstick of held-out real images is the validation split (never a
    KIP target), or the test split when the run has no validation split. The section says which."""
    split = "validation" if len(prepared.y_val) else "test"
    heldout = prepared.x_val if split == "validation" else prepared.x_test
    section = privacy.report(images, prepared.x_train, heldout, config.seed,
                             learned=~kip.corruption_mask(images.shape, config))
    return {**section, "heldout_split": split}


def evaluate(
    distilled: DistilledSet, prepared: Prepared, config: EvaluateConfig, default_prepared: Prepared | None = None
) -> dict[str, Any]:
    """KRR test accuracy/MSE of the support set beside the strongest simple baselines of its size.

    Baselines: class-balanced random real subsets under the run's preprocessing and, when that is
    not the default, under the default one (`default_prepared`: the same data and split,
    standardised), of which the better is `baseline_test_accuracy` (`baseline_preprocessing` says
    which); and Label Solve (the same kind of real images with closed-form labels).
    """
    if tuple(distilled.images.shape[1:]) != tuple(prepared.x_test.shape[1:]):
        raise UserError(
            f"support images have shape {tuple(distilled.images.shape[1:])}; "
            f"the test images are {tuple(prepared.x_test.shape[1:])}"
        )
    kernel = KernelConfig(**distilled.metadata["kernel"])
    kernel_fn = kernels.make(kernel)
    scores = scoring.krr_scores(
        kernel_fn, distilled.images, distilled.labels, prepared.x_test, prepared.y_test,
        prepared.num_classes, config.reg, config.batch_size,
    )
    per_class = max(1, len(distilled.images) // prepared.num_classes)
    candidates = {prepared.transform.method: prepared}
    if default_prepared is not None:
        candidates.setdefault(default_prepared.transform.method, default_prepared)
    random_real = {
        method: scoring.random_subset_baseline(
            kernel_fn, data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes, per_class,
            config.reg, config.baseline_repeats, config.seed, config.batch_size,
        )
        for method, data in candidates.items()
    }
    best = max(random_real, key=lambda method: random_real[method]["accuracy"])
    solved = kip.label_solve(prepared.x_train, prepared.y_train, prepared.num_classes, kernel_fn,
                             DistillConfig(method="label_solve", support_per_class=per_class, reg=config.reg,
                                           seed=config.seed))
    label_solve = scoring.krr_scores(kernel_fn, solved.images, solved.labels, prepared.x_test, prepared.y_test,
                                     prepared.num_classes, config.reg, config.batch_size)
    metrics: dict[str, Any] = {
        "krr_test_accuracy": scores["accuracy"],
        "krr_test_mse": scores["mse"],
        "baseline_test_accuracy": random_real[best]["accuracy"],
        "baseline_test_accuracy_std": random_real[best]["accuracy_std"],
        "baseline_test_mse": random_real[best]["mse"],
        "baseline_preprocessing": best,
        "label_solve_test_accuracy": label_solve["accuracy"],
        "support_size": int(len(distilled.images)),
        "test_size": int(len(prepared.y_test)),
    }
    for method, result in random_real.items():
        metrics[f"baseline_{method}_test_accuracy"] = result["accuracy"]
    return metrics


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
