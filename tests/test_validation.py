"""The validation split: carved from the training split, never a KIP target, and the only data a
run looks at while it runs. The test split is read for reported numbers only.

The leak tests poison a split with NaN: one NaN image among KIP's targets makes the loss NaN (and
the run stops), and one among the images a monitor or report reads makes its number NaN.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts.npz import DistilledSet
from pipeline.data import splits
from pipeline.data.prepared import prepare, reprepare
from pipeline.errors import UserError
from pipeline.evaluate import transfer
from pipeline.run import workflow
from pipeline.run.config import DataConfig, DistillConfig, KernelConfig, PreprocessConfig

DIGITS = DataConfig("embedded", "digits", validation_fraction=0.2, seed=3)
RUN = DistillConfig(support_per_class=2, steps=3, target_batch=100000, eval_every=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def prepared():
    return prepare(DIGITS, PreprocessConfig("standardize"), cache_dir=Path("/nonexistent"))


def _read_only(run):
    for array in (run.distilled.images, run.distilled.labels, run.distilled.classes):
        array.flags.writeable = False  # shared between tests: none may change it
    return run


@pytest.fixture(scope="module")
def clean_run(prepared):
    """workflow.distill(RUN, unmonitored) on the clean splits: the distilled set that the reprepare
    and network tests read (read-only; it used to be distilled once per test)."""
    return _read_only(workflow.distill(prepared, KernelConfig(), dataclasses.replace(RUN, eval_every=0), progress=False))


@pytest.fixture(scope="module")
def validation_poisoned_run(prepared):
    """The same run with every validation image NaN: the leak test's subject and the test-split
    test's control."""
    poisoned = dataclasses.replace(prepared, x_val=np.full_like(prepared.x_val, np.nan))
    return _read_only(workflow.distill(poisoned, KernelConfig(), dataclasses.replace(RUN, eval_every=0), progress=False))


def test_the_split_is_class_balanced_seeded_and_disjoint_from_training(digits, prepared):
    idx = splits.validation_indices(digits.y_train, 10, 287, seed=3)
    assert len(idx) == 280 and np.all(np.bincount(digits.y_train[idx], minlength=10) == 28)
    assert np.array_equal(idx, splits.validation_indices(digits.y_train, 10, 287, seed=3))
    assert not np.array_equal(idx, splits.validation_indices(digits.y_train, 10, 287, seed=4))
    assert len(prepared.y_val) == 280 and len(prepared.y_train) + 280 == len(digits.y_train)
    train_rows = {row.tobytes() for row in prepared.x_train}
    assert not any(row.tobytes() in train_rows for row in prepared.x_val)
    record = prepared.provenance["validation"]
    assert record == {"of": "training split", "fraction": 0.2, "seed": 3, "size": 280, "sha256": splits.split_digest(idx)}


def test_a_validation_image_is_never_a_kip_target_or_support(validation_poisoned_run, clean_run):
    """Finite, and more: the same support and losses as the clean run, so no validation image
    entered the optimisation at all."""
    run = validation_poisoned_run
    assert all(math.isfinite(h["loss"]) for h in run.history)
    assert np.isfinite(run.distilled.images).all() and np.isfinite(run.distilled.labels).all()
    np.testing.assert_array_equal(run.distilled.images, clean_run.distilled.images)
    np.testing.assert_array_equal(run.distilled.labels, clean_run.distilled.labels)
    assert [h["loss"] for h in run.history] == [h["loss"] for h in clean_run.history]


def test_distilling_never_reads_the_test_split(prepared, validation_poisoned_run):
    """Learning curve, privacy yardstick, everything a distill run computes: none of it is NaN when
    every test image is NaN. (The same poison in the validation split does show: the control.)"""
    poisoned = dataclasses.replace(prepared, x_test=np.full_like(prepared.x_test, np.nan))
    run = workflow.distill(poisoned, KernelConfig(), RUN, progress=False)
    assert [h["step"] for h in run.history if "val_accuracy" in h] == [0, 1, 2, 3]
    assert all(math.isfinite(v) for h in run.history for v in h.values())
    json.dumps(run.distilled.metadata, allow_nan=False)  # raises on any NaN in the privacy report
    assert run.distilled.metadata["privacy"]["heldout_split"] == "validation"

    with pytest.raises(ValueError):  # the control: a NaN validation split
        json.dumps(validation_poisoned_run.distilled.metadata, allow_nan=False)


def test_reprepare_rebuilds_the_recorded_split(prepared, clean_run):
    run = clean_run
    again = reprepare(run.distilled, cache_dir=Path("/nonexistent"))
    assert np.array_equal(again.x_val, prepared.x_val) and np.array_equal(again.x_train, prepared.x_train)
    metadata = json.loads(json.dumps(run.distilled.metadata))
    metadata["validation"]["sha256"] = "0" * 64
    altered = DistilledSet(run.distilled.images, run.distilled.labels, run.distilled.classes,
                           run.distilled.transform, metadata)
    with pytest.raises(UserError, match="validation split rebuilt"):
        reprepare(altered, cache_dir=Path("/nonexistent"))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, True, "x"])
def test_bad_fractions_are_one_line(fraction):
    with pytest.raises(UserError, match=r"data.validation_fraction=.* is not allowed; expected a number in \[0, 1\)"):
        DataConfig("embedded", "digits", validation_fraction=fraction)


def test_monitoring_without_a_validation_split_is_refused():
    bare = prepare(dataclasses.replace(DIGITS, validation_fraction=0.0), PreprocessConfig("standardize"),
                   cache_dir=Path("/nonexistent"))
    with pytest.raises(UserError, match="distill.eval_every=1 scores a validation split"):
        workflow.distill(bare, KernelConfig(), RUN, progress=False)


def _poison_test(prepared):
    return dataclasses.replace(prepared, x_test=np.full_like(prepared.x_test, np.nan))


def test_choosing_kip_settings_never_reads_the_test_split(prepared, monkeypatch):
    """benchmarks/select_kip_settings.py picks the matrix's learning rates and step counts: on a
    test split of NaN it picks the same, from the same (finite) validation curves."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import select_kip_settings as selection

    grid = {"spcs": [1], "every": 2, "budgets": {(1, False): 4, (1, True): 4}, "learning_rates": (0.01, 0.04)}
    clean = selection.select_settings(prepared, KernelConfig(), **grid)
    poisoned = selection.select_settings(_poison_test(prepared), KernelConfig(), **grid)
    strip = lambda runs: [{k: v for k, v in run.items() if k != "cpu_seconds"} for run in runs]  # noqa: E731
    assert poisoned[0] == clean[0] and strip(poisoned[1]) == strip(clean[1])
    assert set(clean[0]) == {"spc1_fixed", "spc1_labels"}
    assert all(math.isfinite(p["val_accuracy"]) for run in clean[1] for p in run["curve"])
    control = dataclasses.replace(prepared, x_val=np.full_like(prepared.x_val, np.nan))
    _, runs = selection.select_settings(control, KernelConfig(), **grid)
    assert strip(runs) != strip(clean[1])  # the control: poison where it does read shows


def test_choosing_the_conv_cells_loss_and_schedule_never_reads_the_test_split(prepared, monkeypatch):
    """benchmarks/select_conv_kip_settings.py picks the ConvNet-kernel cells' loss and learning-rate
    schedule: on a test split of NaN it picks the same, from the same finite validation scores."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import select_conv_kip_settings as selection

    import paper  # experiments/paper's cell configs, put on the path by the selection script

    kip = {"steps": 2, "learning_rate": 0.01, "target_batch": 100, "eval_every": 1, "keep": "best_validation"}
    kernel = {"architecture": "conv_rf", "kind": "nngp", "depth": 2, "rf_width": 8, "rf_networks": 1, "rf_eval_networks": 2}
    spec = {"dataset": "digits", "kernel": kernel, "support_per_class": 1, "kip": kip, "kip_labels": kip, "train": "fc"}
    cell = paper.cell_config("digits-conv_rf-1", {"repeats": 1, "seed": 0}, spec, {"fc": {}})
    strip = lambda runs: [{k: v for k, v in run.items() if k not in ("cpu_minutes", "wall_minutes", "other_load_cores")}
                          for run in runs]  # noqa: E731
    clean = selection.select_settings(prepared, cell, monitored=140)
    poisoned = selection.select_settings(_poison_test(prepared), cell, monitored=140)
    assert poisoned[0] == clean[0] and strip(poisoned[1]) == strip(clean[1])
    assert set(clean[0]) == {"fixed", "labels"} and len(clean[1]) == 2 * len(selection.CANDIDATES)
    assert all(run["heldout_images"] == 140 and math.isfinite(run["heldout_accuracy"]) for run in clean[1])
    control = dataclasses.replace(prepared, x_val=np.full_like(prepared.x_val, np.nan))
    assert strip(selection.select_settings(control, cell, monitored=140)[1]) != strip(clean[1])  # the control


def test_network_settings_and_learning_curves_never_read_the_test_split(prepared, clean_run, monkeypatch):
    """The label scale and optimizer a network trains with, and the train stage's learning curve, come
    from the validation split: a NaN test split changes none of them (it only spoils the final test number).
    The poisoned side's networks are the ones `transfer` trains (recorded, not trained a second time)."""
    from pipeline.run.config import TrainConfig

    distilled = clean_run.distilled
    config = TrainConfig(width=32, steps=20, seeds=1, eval_every=10)
    clean = transfer.train_networks(distilled, prepared, config, progress=False)
    trained, train_networks = [], transfer.train_networks
    monkeypatch.setattr(transfer, "train_networks", lambda *args, **kwargs: trained.append(
        train_networks(*args, **kwargs)) or trained[-1])
    _, curve = transfer.transfer(distilled, _poison_test(prepared), config, progress=False)
    (poisoned,) = trained  # transfer's own train_networks(distilled, poisoned split, config)
    assert poisoned["label_scale"] == clean["label_scale"] and poisoned["settings"] == clean["settings"]
    steps = {}
    for side in ("distilled", "baseline"):
        assert [r.curve for r in poisoned[side]] == [r.curve for r in clean[side]]
        steps[side] = list(range(10, clean["settings"][side]["steps"] + 1, 10))  # 20 (SGD) or 1000 (Adam)
        assert [p["step"] for p in clean[side][0].curve] == steps[side] and "val_accuracy" in clean[side][0].curve[0]
    assert [p["step"] for p in curve] == sorted(set(steps["distilled"]) | set(steps["baseline"]))
    assert all(math.isfinite(v) for p in curve for v in p.values())


def test_labels_solved_for_a_network_read_training_images_only(prepared, clean_run):
    """Solved labels come from training images: NaN validation and test splits leave them, and the
    choice between label sources (which reads validation) untouched by the test split."""
    from pipeline.evaluate import finite
    from pipeline.run.config import TrainConfig

    config = TrainConfig(width=32, steps=20, seeds=1, eval_every=0, labels_choice="validation", solve_targets=200)
    solve_on = transfer.solve_targets(prepared, config)
    x, classes = prepared.x_train[:20], prepared.y_train[:20]
    solved = finite.solved_labels(x, prepared.num_classes, config, 3, solve_on)
    blind = dataclasses.replace(_poison_test(prepared), x_val=np.full_like(prepared.x_val, np.nan))
    assert np.array_equal(finite.solved_labels(x, prepared.num_classes, config, 3, transfer.solve_targets(blind, config)), solved)
    assert np.isfinite(solved).all()
    distilled = clean_run.distilled
    clean = transfer.train_networks(distilled, prepared, config, progress=False)
    poisoned = transfer.train_networks(distilled, _poison_test(prepared), config, progress=False)
    assert poisoned["settings"] == clean["settings"]
