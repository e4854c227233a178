"""Finite networks trained on a support set, beside networks trained on random real subsets of the
same size: the paper's transfer test, as whole runs the `train` stage, `kip train` and the paper
matrix's `networks` stages share.

    transfer(set, prepared, train) -> metrics, curve    the support's networks and random subsets'
    train_networks(set, prepared, train)                one side's (or both sides') networks
    train_baseline_networks(prepared, per_class, train) the random real subsets' networks alone

Each side chooses its label scale and optimizer on the validation split (`choose_network_settings`);
the test split is scored once per network, at the end. Kept apart from `workflow` (KIP, KRR) so the
paper matrix's KIP stages do not depend on how networks are trained.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from pipeline.artifacts.npz import DistilledSet
from pipeline.data.prepared import Prepared, check_same_data
from pipeline.distill import kip, krr
from pipeline.errors import UserError
from pipeline.run.config import TrainConfig


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
        "nn_labels": runs["settings"]["distilled"]["labels"],  # support (its own) or solved (for each network)
        "nn_baseline_labels": runs["settings"]["baseline"]["labels"],
        "nn_baseline_test_accuracy": float(np.mean(baseline_acc)),
        "nn_baseline_test_accuracy_std": float(np.std(baseline_acc)),
        # the final networks on the validation split: what to compare runs by (the test split is for reporting)
        **({"nn_val_accuracy": _mean_validation(runs["distilled"], prepared),
            "nn_baseline_val_accuracy": _mean_validation(runs["baseline"], prepared)} if len(prepared.y_val) else {}),
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


def _mean_validation(results: list, prepared: Prepared) -> float:
    return float(np.mean([validation_accuracy(r, prepared) for r in results]))


def validation_accuracy(result: Any, prepared: Prepared) -> float:
    """A trained network's accuracy on the validation split: what to compare supports by, since
    picking the support (or the distillation settings behind it) by test accuracy would fit the test split."""
    if len(prepared.y_val) == 0:
        raise UserError("comparing networks on validation needs a validation split; set data.validation_fraction > 0")
    outputs = np.concatenate([result.predict(prepared.x_val[i:i + 2000]) for i in range(0, len(prepared.y_val), 2000)])
    return float(np.mean(np.argmax(outputs, axis=1) == prepared.y_val))


def _optimizer_text(settings: dict[str, Any]) -> str:
    return f"{settings['optimizer']} {settings['learning_rate']:g} x {settings['steps']} steps"


def train_networks(distilled: DistilledSet, prepared: Prepared, config: TrainConfig, baseline: bool = True, *,
                   progress: bool = True) -> dict[str, Any]:
    """The networks behind `transfer`: {"distilled": [TrainResult per seed], "baseline": [...]
    (empty unless `baseline`), "label_scale": {side: its scale}, "settings": {side: its settings}}.
    `progress` shows one bar over every training step of every network, candidates included."""
    if tuple(distilled.images.shape[1:]) != tuple(prepared.x_test.shape[1:]):
        raise UserError(
            f"distilled images have shape {tuple(distilled.images.shape[1:])} but the test images are "
            f"{tuple(prepared.x_test.shape[1:])}; expected the same shape"
        )
    check_same_data(distilled, prepared)
    sides = 1 + baseline
    with _bar(config, sides, progress) as bar:
        results, chosen = _train_side(distilled.images, distilled.labels, distilled.classes, prepared, config, bar)
        runs: dict[str, Any] = {"distilled": results, "baseline": []}
        settings = {"distilled": chosen, "baseline": None}
        if baseline:
            per_class = max(1, len(distilled.images) // prepared.num_classes)
            runs["baseline"], settings["baseline"] = _train_random_side(prepared, per_class, config, bar)
    runs["label_scale"] = {side: s.label_scale if s else None for side, s in settings.items()}
    runs["settings"] = {side: settings_summary(s) if s else None for side, s in settings.items()}
    return runs


def train_baseline_networks(prepared: Prepared, per_class: int, config: TrainConfig, *,
                            progress: bool = True) -> dict[str, Any]:
    """The random-real-subset side of `train_networks` alone (the same subsets, seeds and settings
    choice, so the same numbers): {"baseline": [TrainResult per seed], "settings": its settings}.
    The paper matrix trains it once per (dataset, size) and shares it between kernels."""
    with _bar(config, 1, progress) as bar:
        results, chosen = _train_random_side(prepared, per_class, config, bar)
    return {"baseline": results, "label_scale": chosen.label_scale, "settings": settings_summary(chosen)}


def _bar(config: TrainConfig, sides: int, progress: bool):
    from tqdm.auto import tqdm

    side_steps = sum(c.steps for c in network_candidates(config)) + config.seeds * config.steps
    return tqdm(total=sides * side_steps, desc="networks", unit="step", disable=not progress,
                dynamic_ncols=True, mininterval=0.5)


def _train_random_side(prepared: Prepared, per_class: int, config: TrainConfig, bar) -> tuple[list, TrainConfig]:
    """One class-balanced random real subset per seed (subset `index` drawn from (seed, 3, index)),
    its settings chosen on the first subset, as for a support."""
    subsets = []
    for index in range(config.seeds):
        rng = np.random.default_rng([config.seed, 3, index])
        idx = kip.class_balanced_indices(prepared.y_train, per_class, prepared.num_classes, rng)
        classes = prepared.y_train[idx]
        subsets.append((prepared.x_train[idx], np.asarray(krr.centered_one_hot(classes, prepared.num_classes)), classes))
    return _train_side(None, None, None, prepared, config, bar, subsets=subsets)


def _train_side(x, y, classes, prepared: Prepared, config: TrainConfig, bar, subsets=None) -> tuple[list, TrainConfig]:
    """`config.seeds` networks, on (x, y, classes) or on subsets[seed index]; settings chosen on
    validation with the first. Returns the results and the chosen settings."""
    from pipeline.evaluate import finite

    monitor = (prepared.x_val, prepared.y_val) if len(prepared.y_val) else None  # learning curves: validation only
    solve_on = solve_targets(prepared, config)
    results = []
    chosen = config
    for index in range(config.seeds):
        xi, yi, ci = subsets[index] if subsets is not None else (x, y, classes)
        if index == 0:
            chosen = choose_network_settings(xi, yi, ci, prepared, config, on_step=bar.update)
            bar.total += config.seeds * (chosen.steps - config.steps)  # the chosen optimizer's step count
            bar.refresh()
        results.append(finite.train(
            xi, yi, ci, prepared.x_test, prepared.y_test, prepared.num_classes, chosen, config.seed * 1000 + index,
            monitor=monitor, on_step=bar.update, solve_on=solve_on,
        ))
    return results, chosen


def network_candidates(config: TrainConfig) -> list[TrainConfig]:
    """The settings `choose_network_settings` trains one network each for: every label scale of
    AUTO_LABEL_SCALES (label_scale_choice=validation, for losses that scale labels) with the
    configured optimizer and, with optimizer_choice=validation, with AUTO_OPTIMIZER. Empty when
    there is nothing to choose. The configured optimizer comes first, so it wins ties."""
    from pipeline.run.config import AUTO_LABEL_SCALES, AUTO_OPTIMIZER

    scales = (AUTO_LABEL_SCALES if config.label_scale_choice == "validation" and config.loss in ("mse", "mse_centered")
              else (config.label_scale,))
    optimizers = [config]
    if config.optimizer_choice == "validation":
        optimizers.append(dataclasses.replace(config, momentum=0.0, **AUTO_OPTIMIZER))
    candidates = [dataclasses.replace(o, label_scale=s, labels=source, eval_every=0)
                  for source in config.label_sources() for o in optimizers for s in scales]
    return candidates if len(candidates) > 1 else []


def solve_targets(prepared: Prepared, config: TrainConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """The training images (and classes) labels are solved on when a network may train on solved
    labels: `config.solve_targets` of them, class-balanced, drawn from (seed, 4). Never validation
    or test images: the prepared training split holds neither."""
    if "solved" not in config.label_sources():
        return None
    per_class = max(1, min(config.solve_targets // prepared.num_classes, int(np.bincount(prepared.y_train).min())))
    idx = kip.class_balanced_indices(prepared.y_train, per_class, prepared.num_classes,
                                     np.random.default_rng([config.seed, 4]))
    return prepared.x_train[idx], prepared.y_train[idx]


def choose_network_settings(x: np.ndarray, y: np.ndarray, classes: np.ndarray, prepared: Prepared,
                            config: TrainConfig, *, on_step: Callable[[], object] | None = None) -> TrainConfig:
    """`config` with the label scale and optimizer (with its learning rate and steps) whose network
    does best on the validation split, one network per `network_candidates` entry (one that
    diverges is skipped); `config` unchanged when there is nothing to choose."""
    from pipeline.evaluate import finite

    candidates = network_candidates(config)
    if not candidates:
        return config
    if len(prepared.y_val) == 0:
        raise UserError("train.label_scale_choice=validation and train.optimizer_choice=validation need a validation "
                        "split; set data.validation_fraction > 0 or set both to fixed")
    scores = {}
    solve_on = solve_targets(prepared, config)
    seed = config.seed * 1000 + 999
    solved = None  # solved once: every candidate starts from the same init
    for index, candidate in enumerate(candidates):
        if candidate.labels == "solved" and solved is None:
            solved = finite.solved_labels(x, prepared.num_classes, candidate, seed, solve_on)
        try:
            result = finite.train(x, y, classes, prepared.x_val, prepared.y_val, prepared.num_classes, candidate,
                                  seed, on_step=on_step, solve_on=solve_on, solved=solved)
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
            "steps": config.steps, "labels": config.labels}
