"""The KIP paper's comparison as a matrix of independent cells, and the report that reads them.

A cell is one (dataset, kernel, images per class). It runs the four methods the paper compares,
all scored by KRR with the cell's kernel on the full test split:

    random       class-balanced random real images (mean ± std over `repeats` subsets)
    label_solve  the same kind of real images with labels solved in closed form (paper, Sec. 3)
    kip          KIP, labels fixed to the one-hot classes
    kip_labels   KIP with the labels learned too

Each method's CPU time (all threads) is part of the result. Finite networks trained on the saved
supports, and on random real subsets, are `paper_networks`' separate stages, so changing
how networks train never re-runs KIP. Cells share nothing, so DVC reruns exactly the cells whose
params changed (experiments/paper/dvc.yaml).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.artifacts.npz import DistilledSet
from pipeline.data.prepared import Prepared
from pipeline.distill import kip, krr
from pipeline.errors import UserError
from pipeline.evaluate import membership, scoring
from pipeline.kernels import functions as kernels
from pipeline.run.config import DistillConfig, KernelConfig, TrainConfig, from_mapping

METHODS = ("random", "label_solve", "kip", "kip_labels")
DATASETS = {"mnist": "registry", "fashion_mnist": "registry", "digits": "embedded"}  # name -> data source
"""The paper's two datasets, and scikit-learn's digits for quick trials and tests."""


@dataclass(frozen=True)
class CellConfig:
    """Everything one cell computes from; built from `shared` overlaid with `cells.<key>`, and the
    `train.<name>` settings the cell names for its networks."""

    dataset: str
    kernel: KernelConfig
    support_per_class: int
    kip: DistillConfig
    kip_labels: DistillConfig
    train: TrainConfig
    train_name: str = "fc"  # which `train.<name>`: the random-subset networks it is compared with train alike
    repeats: int = 3
    reg: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UserError(f"dataset={self.dataset!r} is not allowed; expected one of: {'|'.join(DATASETS)}")
        if self.support_per_class != self.kip.support_per_class:
            raise UserError("support_per_class must equal kip.support_per_class (cell_config keeps them equal)")
        if not self.kip_labels.learn_labels or self.kip.learn_labels:
            raise UserError("kip.learn_labels must be false and kip_labels.learn_labels true (they are the two KIP rows)")


def train_settings(name: Any, where: str, settings: Mapping[str, Any], seed: int) -> TrainConfig:
    """`train.<name>` of the matrix's params as a TrainConfig (with the matrix's seed).

    Networks are configured by name, not per cell, so that each DVC stage depends on the settings of
    its own networks only: changing the ConvNets' settings re-runs the ConvNet stages alone, and no
    KIP stage (`cells.<key>.train` holds just the name)."""
    if not isinstance(name, str) or name not in settings:
        raise UserError(f"{where}.train={name!r} is not allowed; expected the name of a train settings entry, one of: "
                        f"{'|'.join(sorted(settings)) or '(none: params.yaml has no train section)'}")
    try:
        return from_mapping(TrainConfig, {"seed": seed, **(settings[name] or {})}, f"train.{name}")
    except UserError as error:  # TrainConfig's own checks name train.<field>: say which entry too
        if str(error).startswith(f"train.{name}."):
            raise
        raise UserError(f"train.{name}: {error}") from None


CELL_KEYS = ("dataset", "kernel", "support_per_class", "kip", "kip_labels", "train")
"""What a cell may set; repeats, reg and seed are `shared` only, so every cell is scored alike."""


def cell_config(key: str, shared: Mapping[str, Any], cell: Mapping[str, Any],
                train: Mapping[str, Any]) -> CellConfig:
    """`cells.<key>` over `shared`, key by key (one level deep), into config records; the cell's
    `train` names its networks' settings in `train` (the params' `train` section)."""
    unknown = sorted(set(cell) - set(CELL_KEYS))
    if unknown:
        raise UserError(f"cells.{key}.{unknown[0]} is not a known key; expected one of: {'|'.join(CELL_KEYS)}")
    merged: dict[str, Any] = {name: dict(value) if isinstance(value, Mapping) else value for name, value in shared.items()}
    for name, value in cell.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), dict):
            merged[name].update(value)
        else:
            merged[name] = value
    known = {f.name for f in dataclasses.fields(CellConfig)} - {"train_name"}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UserError(f"shared.{unknown[0]} is not a known key; expected one of: {'|'.join(sorted(known - {'train'}))}")
    spc = merged.get("support_per_class")
    seed = int(merged.get("seed", 0))
    common = {"support_per_class": spc, "reg": merged.get("reg", 1e-6), "seed": seed, "checkpoint_every": 0,
              "eval_every": 0}
    return CellConfig(
        dataset=merged.get("dataset"),
        kernel=from_mapping(KernelConfig, merged.get("kernel"), f"cells.{key}.kernel"),
        support_per_class=spc,
        kip=from_mapping(DistillConfig, {**common, **merged.get("kip", {}), "learn_labels": False}, f"cells.{key}.kip"),
        kip_labels=from_mapping(DistillConfig, {**common, **merged.get("kip_labels", {}), "learn_labels": True},
                                f"cells.{key}.kip_labels"),
        train=train_settings(merged.get("train"), f"cells.{key}", train, seed),
        train_name=merged.get("train"),
        repeats=int(merged.get("repeats", 3)),
        reg=float(merged.get("reg", 1e-6)),
        seed=seed,
    )


@dataclass
class MethodResult:
    krr_accuracy: list[float] = field(default_factory=list)  # one per seed, test split
    krr_val_accuracy: list[float] = field(default_factory=list)  # the same supports on the validation split
    nn_accuracy: list[float] = field(default_factory=list)
    nn_label_scale: float | None = None  # the train.label_scale the networks used (chosen on validation)
    nn_settings: dict[str, Any] | None = None  # label scale, optimizer, learning rate, steps (chosen on validation)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    steps: int | None = None  # a KIP row's step budget
    kept_step: int | None = None  # the step whose support it kept (keep: best_validation)

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, Any]:
            if not values:
                return {"mean": None, "std": None, "n": 0}
            return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}

        return {"krr": stats(self.krr_accuracy), "krr_val": stats(self.krr_val_accuracy), "nn": stats(self.nn_accuracy),
                "nn_label_scale": self.nn_label_scale, "nn_settings": self.nn_settings, "cpu_seconds": round(self.cpu_seconds, 1), "wall_seconds": round(self.wall_seconds, 1),
                **({"steps": self.steps, "kept_step": self.kept_step} if self.steps is not None else {})}


def run_cell(prepared: Prepared, cell: CellConfig, progress: bool = False,
             checkpoints: Path | None = None) -> tuple[dict[str, Any], dict[str, DistilledSet]]:
    """All four methods of one cell by KRR: the JSON-ready result, and every support set behind a number in
    it (Label Solve per repeat, both KIP rows), with full lineage, so `kip evaluate` re-scores them.

    Each support is scored on the test split (the reported number) and on the validation split
    (what settings are chosen on). With `checkpoints` (a directory), each KIP run checkpoints to
    `<checkpoints>/<kip|kip_labels>.npz` as its `checkpoint_every` says, and a re-run resumes it
    (kip's checkpoint key covers params, data, code and machine, so a stale one is replaced).
    """
    from pipeline.run import workflow

    for config in (cell.kip, cell.kip_labels):  # before any work: a setting the kernel's loop lacks is one line
        workflow.check_distill_settings(cell.kernel, config)
    kernel_fn = kernels.make(cell.kernel)
    classes = prepared.num_classes
    results = {name: MethodResult() for name in METHODS}
    supports: dict[str, DistilledSet] = {}

    def score(result: MethodResult, images: np.ndarray, labels: np.ndarray) -> None:
        for x, y, scores in ((prepared.x_test, prepared.y_test, result.krr_accuracy),
                             (prepared.x_val, prepared.y_val, result.krr_val_accuracy)):
            if len(y):
                scores.append(scoring.krr_scores(kernel_fn, images, labels, x, y, classes, cell.reg)["accuracy"])

    compared: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the supports the membership attacks compare
    with timed(results["random"]):
        for repeat in range(cell.repeats):
            rng = np.random.default_rng([cell.seed, 2, repeat])
            idx = kip.class_balanced_indices(prepared.y_train, cell.support_per_class, classes, rng)
            score(results["random"], prepared.x_train[idx], krr.centered_one_hot(prepared.y_train[idx], classes))
            compared.setdefault("random", (prepared.x_train[idx], krr.centered_one_hot(prepared.y_train[idx], classes)))
    with timed(results["label_solve"]):
        for repeat in range(cell.repeats):
            config = dataclasses.replace(cell.kip, method="label_solve", loss="mse", seed=cell.seed + repeat)
            solved = workflow.distill(prepared, cell.kernel, config, progress=False).distilled
            score(results["label_solve"], solved.images, solved.labels)
            supports[f"label_solve_{repeat}"] = solved
    for name in ("kip", "kip_labels"):
        config = getattr(cell, name)
        with timed(results[name]):
            checkpoint = None if checkpoints is None else Path(checkpoints) / f"{name}.npz"
            distilled = workflow.distill(prepared, cell.kernel, config, checkpoint=checkpoint, progress=progress).distilled
            score(results[name], distilled.images, distilled.labels)
            supports[name] = distilled
        results[name].steps = config.steps
        results[name].kept_step = distilled.metadata.get("best_step")  # None unless keep: best_validation
        compared[name] = (distilled.images, distilled.labels)
    return {
        "dataset": cell.dataset,
        "kernel": dataclasses.asdict(cell.kernel),
        "kernel_name": kernel_name(cell.kernel),
        "support_per_class": cell.support_per_class,
        "images": cell.support_per_class * classes,
        "train": cell.train_name,
        "methods": {name: result.summary() for name, result in results.items()},
        "config": {"kip": dataclasses.asdict(cell.kip), "kip_labels": dataclasses.asdict(cell.kip_labels),
                   "repeats": cell.repeats, "reg": cell.reg},
        "validation": prepared.provenance.get("validation"),
        "privacy": privacy_rows(prepared, kernel_fn, cell, compared, supports),
    }, supports


def privacy_rows(prepared: Prepared, kernel_fn, cell: CellConfig, compared: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 supports: Mapping[str, DistilledSet]) -> dict[str, Any]:
    """Per support (the first random real subset, both KIP rows): the membership attacks' AUCs
    (pipeline/evaluate/membership.py: training members against validation non-members, one draw
    for all three) and, for the KIP rows, the nearest-training-image distances their metadata holds
    beside held-out real images' (a random subset's own images are training images: distance 0)."""
    rows: dict[str, Any] = {}
    for name, (images, labels) in compared.items():
        row: dict[str, Any] = membership.report(kernel_fn, images, labels, prepared.x_train, prepared.y_train,
                                                prepared.x_val, prepared.y_val, prepared.num_classes, cell.reg, cell.seed)
        nearest = supports[name].metadata.get("privacy") if name in supports else None
        if nearest:
            row["nearest_train_distance_median"] = nearest["support"]["median"]
            row["real_heldout_distance_median"] = nearest["real_heldout_images"]["median"]
        rows[name] = row
    return rows


def kernel_name(spec: KernelConfig) -> str:
    if spec.architecture == "rbf":
        return "RBF"
    if spec.architecture == "conv_rf":
        return f"ConvNet-RF {spec.kind.upper()}"
    return f"{spec.architecture.upper()} {spec.kind.upper()}"


class timed:
    """Adds the CPU seconds (all threads of this process) and wall seconds of the block to a result."""

    def __init__(self, result: MethodResult):
        self.result = result

    def __enter__(self) -> None:
        self.start = (time.process_time(), time.perf_counter())

    def __exit__(self, *exc) -> None:
        self.result.cpu_seconds += time.process_time() - self.start[0]
        self.result.wall_seconds += time.perf_counter() - self.start[1]


def fmt(stats: Mapping[str, Any], scale: float = 100.0) -> str:
    """'97.31 ± 0.09' (percent), '97.31' for one seed, '—' for none."""
    if not stats or stats.get("mean") is None:
        return "—"
    mean = f"{stats['mean'] * scale:.2f}"
    if stats.get("n", 0) > 1 and not math.isnan(stats["std"]):
        return f"{mean} ± {stats['std'] * scale:.2f}"
    return mean
