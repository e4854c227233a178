"""Whole runs after `pipeline.data.prepared.prepare`; the DVC stages and the CLI share them:

    distill(prepared, kernel, distill) -> run    KIP (or Label Solve) on the prepared training split
    evaluate(set, prepared, evaluate) -> metrics KRR on the prepared test split, beside random subsets

Finite networks trained on a set are `pipeline.evaluate.transfer`'s. These take config records and values;
reading params files and choosing paths is the caller's job.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import pipeline
from pipeline.artifacts import npz as artifacts_npz
from pipeline.artifacts.npz import DistilledSet
from pipeline.data import prepared as prep_io
from pipeline.data.prepared import Prepared
from pipeline.distill import kip
from pipeline.errors import UserError
from pipeline.evaluate import privacy, scoring
from pipeline.kernels import conv_features, functions as kernels
from pipeline.run import distributed
from pipeline.run.config import DistillConfig, EvaluateConfig, KernelConfig

NOT_MIRRORABLE = ("mnist", "digits")  # datasets whose classes a left-right flip changes (a mirrored 2 is no 2)


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
    dataset = prepared.provenance["data"]["name"]
    if config.augment == "crop_flip" and dataset in NOT_MIRRORABLE:
        raise UserError(f"distill.augment=crop_flip mirrors images, and a mirrored {dataset} image is no longer its "
                        "class; expected augment: none|crop")
    kernel_fn = kernels.make(kernel)
    configs = {**prepared.provenance, "kernel": asdict(kernel), "distill": asdict(config)}
    unhashed = set(configs) - set(artifacts_npz.PARAMS_HASH_SECTIONS)
    if unhashed:  # a new lineage section must be added to the hash that readers recompute
        raise RuntimeError(f"lineage sections {sorted(unhashed)} are not in npz.PARAMS_HASH_SECTIONS")
    params_hash = artifacts_npz.params_hash(configs)
    extra: dict[str, Any] = {}
    if config.method == "label_solve":
        if distributed.process_count() > 1:
            raise UserError("several processes run distill.method=kip; run distill.method=label_solve as one process "
                            "(it is one pass over the training set)")
        result = kip.label_solve(prepared.x_train, prepared.y_train, prepared.num_classes, kernel_fn, config)
    else:
        kip_kernel = kip_kernel_for(kernel, config, prepared.x_train.shape[1:])
        result = kip.distill(
            prepared.x_train, prepared.y_train, prepared.num_classes, kip_kernel, config,
            checkpoint=checkpoint, checkpoint_key=checkpoint_key(params_hash, prepared),
            monitor=_monitor(kip_kernel, kernel_fn, kernel, config, prepared), progress=progress,
        )
        if config.keep == "best_validation":
            extra["best_step"] = result.best_step
        if kernel.architecture == "conv_rf" and config.eval_every:
            extra["validation_images"] = min(conv_features.PIPELINE_VAL_IMAGES, len(prepared.y_val))
    metadata: dict[str, Any] = {
        **configs,
        "params_hash": params_hash,
        "seed": config.seed,
        "steps": config.steps if config.method == "kip" else 0,
        "final_loss": next((h["loss"] for h in reversed(result.history) if "loss" in h), None),
        **extra,
        "code_version": pipeline.__version__,
        "privacy": _privacy(result.images, prepared, config),
        "versions": _artifact_versions(kernel),
    }
    distilled = DistilledSet(result.images, result.labels, result.classes.astype(np.int32), prepared.transform, metadata)
    return DistillRun(distilled, result.history, result.initial_images)


def kip_kernel_for(kernel: KernelConfig, config: DistillConfig, image_shape: tuple[int, ...]) -> kip.KipKernel:
    """The kernel KIP trains against: conv_rf draws fresh random ConvNets every step; every other
    architecture is one fixed kernel function."""
    if kernel.architecture == "conv_rf":
        return conv_features.RandomFeatureKernel(conv_features.feature_config(kernel), tuple(image_shape), config.seed)
    return kip.FixedKernel(kernels.make(kernel), {"name": f"kernel.architecture={kernel.architecture}"})


def _monitor(kip_kernel: kip.KipKernel, kernel_fn, kernel: KernelConfig, config: DistillConfig,
             prepared: Prepared) -> kip.Monitor | None:
    """The learning curve's scorer, on the validation split, never the test split: conv_rf's fixed
    draw of kernel.rf_eval_networks networks on the first 2,000 validation images; every other
    kernel's own function on the whole split."""
    if not config.eval_every:
        return None
    if len(prepared.y_val) == 0:
        raise UserError(
            f"distill.eval_every={config.eval_every} scores a validation split, and data.validation_fraction=0 "
            "gives none; set distill.eval_every: 0 or data.validation_fraction > 0"
        )
    if isinstance(kip_kernel, conv_features.RandomFeatureKernel):
        return kip_kernel.monitor(prepared.x_val, prepared.y_val, config.reg, kernel.rf_eval_networks)

    def monitor(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        scores = scoring.krr_scores(
            kernel_fn, images, labels, prepared.x_val, prepared.y_val, prepared.num_classes, config.reg,
            reg_name="distill.reg",
        )
        return {"val_accuracy": scores["accuracy"]}

    return monitor


def check_distill_settings(kernel: KernelConfig, config: DistillConfig) -> None:
    """Refuse kernel/distill combinations that have no meaning together (one line, UserError)."""
    if config.method == "kip" and config.keep == "best_validation" and config.eval_every < 1:
        raise UserError(f"distill.keep=best_validation scores the validation split every distill.eval_every steps, "
                        f"and eval_every={config.eval_every}; expected eval_every >= 1")
    if kernel.architecture == "conv_rf" and config.float64:
        raise UserError("distill.float64=true is not available with kernel.architecture=conv_rf: its random ConvNets "
                        "are float32 Flax modules; expected float64: false")


def _privacy(images: np.ndarray, prepared: Prepared, config: DistillConfig) -> dict[str, Any]:
    """The privacy report; its yardstick of held-out real images is the validation split (never a
    KIP target), or the test split when the run has no validation split. The section says which."""
    split = "validation" if len(prepared.y_val) else "test"
    heldout = prepared.x_val if split == "validation" else prepared.x_test
    section = privacy.report(images, prepared.x_train, heldout, config.seed,
                             learned=~kip.corruption_mask(images.shape, config))
    return {**section, "heldout_split": split}


def evaluate(
    distilled: DistilledSet, prepared: Prepared, config: EvaluateConfig, default_prepared: Prepared | None = None,
    *, kernel_changes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """KRR test accuracy/MSE of the support set beside the strongest simple baselines of its size.

    Baselines: class-balanced random real subsets under the run's preprocessing and, when that is
    not the default, under the default one (`default_prepared`: the same data and split,
    standardised), of which the better is `baseline_test_accuracy` (`baseline_preprocessing` says
    which); and Label Solve (the same kind of real images with closed-form labels).

    The kernel is the one the set was distilled for; `kernel_changes` (explicit, from `kip evaluate
    --kernel ...`) scores it, and the baselines, under that kernel with those fields changed, and the
    metrics then carry `scored_under_kernel` so the number is never mistaken for the set's own.
    """
    prep_io.check_same_data(distilled, prepared)
    if tuple(distilled.images.shape[1:]) != tuple(prepared.x_test.shape[1:]):
        raise UserError(
            f"support images have shape {tuple(distilled.images.shape[1:])}; "
            f"the test images are {tuple(prepared.x_test.shape[1:])}"
        )
    own = KernelConfig(**distilled.metadata["kernel"])
    kernel = replace(own, **kernel_changes) if kernel_changes else own
    kernel_fn = kernels.make(kernel)
    scores = scoring.krr_scores(
        kernel_fn, distilled.images, distilled.labels, prepared.x_test, prepared.y_test,
        prepared.num_classes, config.reg, config.batch_size,
    )
    # The number to choose between runs by: the test split is for reporting, never for choosing.
    validation = scoring.krr_scores(
        kernel_fn, distilled.images, distilled.labels, prepared.x_val, prepared.y_val,
        prepared.num_classes, config.reg, config.batch_size,
    ) if len(prepared.y_val) else None
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
        **({"krr_val_accuracy": validation["accuracy"]} if validation else {}),
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
    if kernel != own:
        metrics["scored_under_kernel"] = {field: value for field, value in asdict(kernel).items()
                                          if value != getattr(own, field)}
        metrics["distilled_for_kernel"] = asdict(own)
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
    """The versions of the libraries that compute a KIP step; neural-tangents wherever it is
    installed (the '.[exact]' extra), so a checkpoint never resumes across its versions either."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {name: version(name) for name in ("jax", "jaxlib", "optax", "numpy", "scipy")}
    try:
        versions["neural-tangents"] = version("neural-tangents")
    except PackageNotFoundError:
        pass
    return dict(sorted(versions.items()))


def _artifact_versions(kernel: KernelConfig) -> dict[str, str]:
    """What a distilled set records: neural-tangents only where it computed the kernel (the exact
    ConvNet kernel), so a set's bytes do not depend on whether that extra happens to be installed."""
    return {name: value for name, value in _library_versions().items()
            if name != "neural-tangents" or kernel.architecture == "conv"}
