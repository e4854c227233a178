"""Whole runs after `pipeline.prepared.prepare`; the DVC stages and the CLI share them:

    distill(prepared, kernel, distill) -> run    KIP (or Label Solve) on the prepared training split
    evaluate(set, prepared, evaluate) -> metrics KRR on the prepared test split, beside random subsets
    transfer(set, prepared, train) -> metrics    finite networks trained on the set, beside random subsets

These take config records and values; reading params files and choosing paths is the caller's job.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import pipeline
from pipeline import evaluate as scoring
from pipeline import kernels, kip, krr, privacy
from pipeline.artifacts import DistilledSet
from pipeline.config import DistillConfig, EvaluateConfig, KernelConfig, TrainConfig
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
    kernel_fn = kernels.make(kernel)
    monitor = None
    if config.eval_every:
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
        "privacy": _privacy(result.images, prepared, config),
        "versions": _library_versions(),
    }
    distilled = DistilledSet(result.images, result.labels, result.classes.astype(np.int32), prepared.transform, metadata)
    return DistillRun(distilled, result.history, result.initial_images)


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


def transfer(distilled: DistilledSet, prepared: Prepared, config: TrainConfig, *,
             progress: bool = True) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train `config.seeds` networks on the support set and as many on class-balanced random real
    subsets of the same size (same budget), all scored on the full test split.

    Returns the metrics and the learning curve (validation accuracy per eval step, mean over seeds;
    empty without a validation split: the test split is scored once, at the end).
    """
    runs = train_networks(distilled, prepared, config, progress=progress)
    distilled_acc = [r.accuracy for r in runs["distilled"]]
    baseline_acc = [r.accuracy for r in runs["baseline"]]
    metrics = {
        "nn_test_accuracy": float(np.mean(distilled_acc)),
        "nn_test_accuracy_std": float(np.std(distilled_acc)),
        "nn_train_accuracy": float(np.mean([r.train_accuracy for r in runs["distilled"]])),
        "nn_label_scale": runs["label_scale"]["distilled"],
        "nn_baseline_label_scale": runs["label_scale"]["baseline"],
        "nn_optimizer": _optimizer_text(runs["settings"]["distilled"]),
        "nn_baseline_optimizer": _optimizer_text(runs["settings"]["baseline"]),
        "nn_baseline_test_accuracy": float(np.mean(baseline_acc)),
        "nn_baseline_test_accuracy_std": float(np.std(baseline_acc)),
        "seeds": config.seeds,
        "support_size": int(len(distilled.images)),
        "test_size": int(len(prepared.y_test)),
    }
    # The sides may train for different step counts (each chooses its optimizer), so a row holds
    # the sides that evaluated at that step.
    sides = {f"{side}_val_accuracy": _mean_curve(runs[side]) for side in ("distilled", "baseline")}
    steps = sorted(set().union(*sides.values()))
    curve = [{"step": step, **{key: values[step] for key, values in sides.items() if step in values}} for step in steps]
    return metrics, curve


def _mean_curve(results: list) -> dict[int, float]:
    """step -> validation accuracy, mean over one side's seeds (all trained with the same settings)."""
    if not results:
        return {}
    points = [{p["step"]: p["val_accuracy"] for p in r.curve if "val_accuracy" in p} for r in results]
    return {step: float(np.mean([p[step] for p in points])) for step in points[0]}


def _optimizer_text(settings: dict[str, Any]) -> str:
    return f"{settings['optimizer']} {settings['learning_rate']:g} x {settings['steps']} steps"


def train_networks(distilled: DistilledSet, prepared: Prepared, config: TrainConfig, baseline: bool = True, *,
                   progress: bool = True) -> dict[str, Any]:
    """The networks behind `transfer`: {"distilled": [TrainResult per seed], "baseline": [...]
    (empty unless `baseline`), "label_scale": {side: the scale each side trained with}}.
    `progress` shows one bar over every training step of every network, label-scale candidates included."""
    from tqdm.auto import tqdm

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
    runs: dict[str, list[finite.TrainResult]] = {"distilled": [], "baseline": []}
    monitor = (prepared.x_val, prepared.y_val) if len(prepared.y_val) else None  # learning curves: validation only
    chosen = {"distilled": config, "baseline": config}
    side_steps = sum(c.steps for c in network_candidates(config)) + config.seeds * config.steps
    with tqdm(total=(1 + baseline) * side_steps, desc="networks", unit="step", disable=not progress,
              dynamic_ncols=True, mininterval=0.5) as bar:
        _train_sides(distilled, prepared, config, baseline, runs, chosen, monitor, bar)
    runs["label_scale"] = {"distilled": chosen["distilled"].label_scale,
                           "baseline": chosen["baseline"].label_scale if baseline else None}
    runs["settings"] = {"distilled": settings_summary(chosen["distilled"]),
                        "baseline": settings_summary(chosen["baseline"]) if baseline else None}
    return runs


def _train_sides(distilled, prepared, config, baseline, runs, chosen, monitor, bar) -> None:
    """Per seed: the support's network, and a random real subset's of the same size (fills `runs`, `chosen`)."""
    from pipeline import finite

    def choose(x, y, classes):
        settings = choose_network_settings(x, y, classes, prepared, config, on_step=bar.update)
        bar.total += config.seeds * (settings.steps - config.steps)  # the chosen optimizer's step count
        bar.refresh()
        return settings

    on_step = bar.update
    per_class = max(1, len(distilled.images) // prepared.num_classes)
    for index in range(config.seeds):
        seed = config.seed * 1000 + index
        if index == 0:
            chosen["distilled"] = choose(distilled.images, distilled.labels, distilled.classes)
        runs["distilled"].append(finite.train(
            distilled.images, distilled.labels, distilled.classes, prepared.x_test, prepared.y_test,
            prepared.num_classes, chosen["distilled"], seed, monitor=monitor, on_step=on_step,
        ))
        if not baseline:
            continue
        idx = kip.class_balanced_indices(prepared.y_train, per_class, prepared.num_classes, np.random.default_rng([config.seed, 3, index]))
        x, classes = prepared.x_train[idx], prepared.y_train[idx]
        y = np.asarray(krr.centered_one_hot(classes, prepared.num_classes))
        if index == 0:
            chosen["baseline"] = choose(x, y, classes)
        runs["baseline"].append(finite.train(
            x, y, classes, prepared.x_test, prepared.y_test, prepared.num_classes, chosen["baseline"], seed,
            monitor=monitor, on_step=on_step,
        ))


def network_candidates(config: TrainConfig) -> list[TrainConfig]:
    """The settings `choose_network_settings` trains one network each for: every label scale of
    AUTO_LABEL_SCALES (label_scale_choice=validation, for losses that scale labels) with the
    configured optimizer and, with optimizer_choice=validation, with AUTO_OPTIMIZER. Empty when
    there is nothing to choose. The configured optimizer comes first, so it wins ties."""
    from pipeline.config import AUTO_LABEL_SCALES, AUTO_OPTIMIZER

    scales = (AUTO_LABEL_SCALES if config.label_scale_choice == "validation" and config.loss in ("mse", "mse_centered")
              else (config.label_scale,))
    optimizers = [config]
    if config.optimizer_choice == "validation":
        optimizers.append(dataclasses.replace(config, momentum=0.0, **AUTO_OPTIMIZER))
    candidates = [dataclasses.replace(o, label_scale=s, eval_every=0) for o in optimizers for s in scales]
    return candidates if len(candidates) > 1 else []


def choose_network_settings(x: np.ndarray, y: np.ndarray, classes: np.ndarray, prepared: Prepared,
                            config: TrainConfig, *, on_step: Callable[[], object] | None = None) -> TrainConfig:
    """`config` with the label scale and optimizer (with its learning rate and steps) whose network
    does best on the validation split, one network per `network_candidates` entry (one that
    diverges is skipped); `config` unchanged when there is nothing to choose."""
    from pipeline import finite

    candidates = network_candidates(config)
    if not candidates:
        return config
    if len(prepared.y_val) == 0:
        raise UserError("train.label_scale_choice=validation and train.optimizer_choice=validation need a validation "
                        "split; set data.validation_fraction > 0 or set both to fixed")
    scores = {}
    for index, candidate in enumerate(candidates):
        try:
            result = finite.train(x, y, classes, prepared.x_val, prepared.y_val, prepared.num_classes, candidate,
                                  config.seed * 1000 + 999, on_step=on_step)
        except UserError:  # diverged with these settings
            continue
        scores[index] = result.accuracy  # scored on the validation images
    if not scores:
        raise UserError(f"network training diverged with every candidate setting (label scales "
                        f"{sorted({c.label_scale for c in candidates})}); lower train.learning_rate (now {config.learning_rate})")
    best = candidates[max(scores, key=scores.get)]
    return dataclasses.replace(best, eval_every=config.eval_every)


def settings_summary(config: TrainConfig) -> dict[str, Any]:
    """What a side's networks were trained with, for metrics and tables."""
    return {"label_scale": config.label_scale, "optimizer": config.optimizer, "learning_rate": config.learning_rate,
            "steps": config.steps}


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
