"""The paper matrix's finite networks: trained on a cell's saved KIP supports, and on random real
subsets once per (dataset, size, train settings), then merged into the cell's result for the report.

Separate from `paper` (KIP and KRR) so that DVC re-runs only these stages when the way
networks train changes, and so the random-subset networks, which do not depend on the kernel, are
trained once per (dataset, size, train settings) instead of once per kernel. Train settings are
named (`train.<name>` in the params: `fc` for the FC and RBF kernels' cells, `conv` for the
ConvNet kernel's), so each cell's networks and its random side's train alike. Both sides go through
`transfer.train_networks` / `transfer.train_baseline_networks`, which choose each side's settings
on the validation split alone; the test split is scored once per network.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.artifacts.npz import DistilledSet
from pipeline.data.prepared import Prepared
from pipeline.errors import UserError
from pipeline.evaluate import transfer
from paper import DATASETS, MethodResult, timed, train_settings
from pipeline.run.config import TrainConfig

SUPPORTS = ("kip", "kip_labels")
"""The cell supports networks train on (Label Solve's real images are the random side's kind)."""


@dataclass(frozen=True)
class BaselineConfig:
    """Random real subsets of one (dataset, size), trained with `train.<train_name>`; built from
    `shared.seed`, `baselines.<key>` and the train settings it names."""

    dataset: str
    support_per_class: int
    train: TrainConfig
    train_name: str = "fc"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UserError(f"dataset={self.dataset!r} is not allowed; expected one of: {'|'.join(DATASETS)}")
        if not isinstance(self.support_per_class, int) or self.support_per_class < 1:
            raise UserError(f"support_per_class={self.support_per_class!r} is not allowed; expected a positive integer")

    @property
    def key(self) -> str:
        return baseline_key(self.dataset, self.support_per_class, self.train_name)


def baseline_key(dataset: str, support_per_class: int, train_name: str) -> str:
    """`baselines.<key>` of a cell's random side: '<dataset>-<images per class>-<train name>'."""
    return f"{dataset}-{support_per_class}-{train_name}"


def cell_baseline_key(cell: Mapping[str, Any]) -> str:
    """The `baselines.<key>` a cell result is compared with: its dataset, size and train name."""
    if not isinstance(cell.get("train"), str):
        raise UserError(f"cell {cell.get('key')}'s result names no train settings (written before cells named them); "
                        f"expected a re-run of its stage: `dvc repro cell@{cell.get('key')}` in experiments/paper")
    return baseline_key(cell["dataset"], cell["support_per_class"], cell["train"])


BASELINE_KEYS = ("dataset", "support_per_class", "train")


def baseline_config(key: str, shared: Mapping[str, Any], baseline: Mapping[str, Any],
                    train: Mapping[str, Any]) -> BaselineConfig:
    """`baselines.<key>` with `shared.seed` and the `train.<name>` it names: the settings every cell
    of that (dataset, size) naming the same train settings trains its support networks with."""
    unknown = sorted(set(baseline) - set(BASELINE_KEYS))
    if unknown:
        raise UserError(f"baselines.{key}.{unknown[0]} is not a known key; expected one of: {'|'.join(BASELINE_KEYS)}")
    seed = int(shared.get("seed", 0))
    name = baseline.get("train")
    settings = train_settings(name, f"baselines.{key}", train, seed)
    config = BaselineConfig(baseline.get("dataset"), baseline.get("support_per_class"), settings, name)
    if config.key != key:
        raise UserError(f"baselines.{key} holds {config.key}; expected the key '<dataset>-<support_per_class>-<train>'")
    return config


def run_support_networks(prepared: Prepared, train: TrainConfig, supports: Mapping[str, DistilledSet],
                         progress: bool = False) -> dict[str, Any]:
    """`train.seeds` networks on each KIP support, settings chosen on validation per support."""
    missing = [name for name in SUPPORTS if name not in supports]
    if missing:
        raise UserError(f"the cell's supports lack {missing[0]}; expected {'|'.join(SUPPORTS)} (the cell stage's outputs)")
    methods = {}
    for name in SUPPORTS:
        result = MethodResult()
        with timed(result):
            runs = transfer.train_networks(supports[name], prepared, train, baseline=False, progress=progress)
        _fill(result, runs["distilled"], runs["settings"]["distilled"])
        methods[name] = _nn_summary(result)
    return {"methods": methods, "train": dataclasses.asdict(train)}


def run_baseline_networks(prepared: Prepared, config: BaselineConfig, progress: bool = False) -> dict[str, Any]:
    """`train.seeds` networks on class-balanced random real subsets of the baseline's size."""
    result = MethodResult()
    with timed(result):
        runs = transfer.train_baseline_networks(prepared, config.support_per_class, config.train, progress=progress)
    _fill(result, runs["baseline"], runs["settings"])
    return {"key": config.key, "dataset": config.dataset, "support_per_class": config.support_per_class,
            "train_name": config.train_name, "methods": {"random": _nn_summary(result)}, "train": dataclasses.asdict(config.train)}


def merge(cell: Mapping[str, Any], networks: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """The cell's KRR result with its support networks and its (dataset, size)'s random networks
    filled in: what the report reads. The two sides must have trained with the same settings."""
    key = cell.get("key", "?")
    expected = cell_baseline_key(cell)
    if baseline["key"] != expected:
        raise UserError(f"cell {key} was given the random-subset networks of {baseline['key']}; expected {expected}")
    if networks["train"] != baseline["train"]:
        changed = sorted(k for k in networks["train"] if networks["train"][k] != baseline["train"].get(k))
        raise UserError(f"cell {key}'s networks trained with train.{changed[0]}={networks['train'][changed[0]]!r} but its "
                        f"random-subset networks ({baseline['key']}) with {baseline['train'][changed[0]]!r}; expected "
                        "the same settings on both sides (re-run both: `dvc repro` in experiments/paper)")
    merged = {**cell, "methods": {name: dict(result) for name, result in cell["methods"].items()},
              "config": {**cell["config"], "train": networks["train"]}}
    for name, result in {**networks["methods"], **baseline["methods"]}.items():
        merged["methods"][name].update({k: result[k] for k in ("nn", "nn_label_scale", "nn_settings")})
        # the networks' own clocks: the random side's are shared by every kernel of the (dataset, size)
        merged["methods"][name].update(nn_cpu_seconds=result["cpu_seconds"], nn_wall_seconds=result["wall_seconds"])
    merged["baseline_key"] = baseline["key"]
    return merged


def _fill(result: MethodResult, runs: list, settings: Mapping[str, Any]) -> None:
    result.nn_accuracy.extend(r.accuracy for r in runs)
    result.nn_label_scale = settings["label_scale"]
    result.nn_settings = dict(settings)


def _nn_summary(result: MethodResult) -> dict[str, Any]:
    full = result.summary()
    return {k: full[k] for k in ("nn", "nn_label_scale", "nn_settings", "cpu_seconds", "wall_seconds")}
