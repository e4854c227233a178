"""The comparison beside every KIP number: the strongest simple baselines of the same size.

Random real subsets under the run's preprocessing and under the default one (the better is the
reported baseline, and the metrics say which), and Label Solve; all checked here against the
scoring functions called directly, so the metrics are what they claim to be.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.data.prepared import prepare
from pipeline.distill import kip
from pipeline.errors import UserError
from pipeline.evaluate import scoring
from pipeline.kernels import functions as kernels
from pipeline.run import workflow
from pipeline.run.config import DataConfig, DistillConfig, EvaluateConfig, KernelConfig, PreprocessConfig

DIGITS = DataConfig("embedded", "digits")
EVAL = EvaluateConfig(baseline_repeats=2)


@pytest.fixture(scope="module")
def zca_run():
    prepared = prepare(DIGITS, PreprocessConfig("zca"), cache_dir=Path("/nonexistent"))
    config = DistillConfig(support_per_class=2, steps=20, target_batch=400, eval_every=0, checkpoint_every=0)
    return prepared, workflow.distill(prepared, KernelConfig(), config, progress=False).distilled


def test_the_reported_baseline_is_the_better_preprocessing(zca_run):
    prepared, distilled = zca_run
    default = prepare(DIGITS, PreprocessConfig(), cache_dir=Path("/nonexistent"))
    metrics = workflow.evaluate(distilled, prepared, EVAL, default)
    kernel_fn = kernels.make(KernelConfig())
    expected = {
        data.transform.method: scoring.random_subset_baseline(
            kernel_fn, data.x_train, data.y_train, data.x_test, data.y_test, 10, 2, EVAL.reg, 2, EVAL.seed)["accuracy"]
        for data in (prepared, default)
    }
    assert metrics["baseline_zca_test_accuracy"] == expected["zca"]
    assert metrics["baseline_standardize_test_accuracy"] == expected["standardize"]
    best = max(expected, key=expected.get)
    assert metrics["baseline_preprocessing"] == best and metrics["baseline_test_accuracy"] == expected[best]


def test_label_solve_stands_beside_it(zca_run):
    prepared, distilled = zca_run
    metrics = workflow.evaluate(distilled, prepared, EVAL)
    kernel_fn = kernels.make(KernelConfig())
    solved = kip.label_solve(prepared.x_train, prepared.y_train, 10, kernel_fn,
                             DistillConfig(method="label_solve", support_per_class=2, seed=EVAL.seed))
    expected = scoring.krr_scores(kernel_fn, solved.images, solved.labels, prepared.x_test, prepared.y_test, 10, EVAL.reg)
    assert metrics["label_solve_test_accuracy"] == expected["accuracy"]
    assert metrics["baseline_preprocessing"] == "zca" and "baseline_standardize_test_accuracy" not in metrics


def test_a_default_preprocessing_run_has_one_random_baseline():
    prepared = prepare(DIGITS, PreprocessConfig(), cache_dir=Path("/nonexistent"))
    config = DistillConfig(support_per_class=1, steps=2, target_batch=400, eval_every=0, checkpoint_every=0)
    distilled = workflow.distill(prepared, KernelConfig(), config, progress=False).distilled
    metrics = workflow.evaluate(distilled, prepared, EVAL, dataclasses.replace(prepared))
    assert [k for k in metrics if k.startswith("baseline_") and k.endswith("_test_accuracy")] == \
        ["baseline_test_accuracy", "baseline_standardize_test_accuracy"]


def test_a_set_is_scored_only_on_the_data_and_preprocessing_it_was_distilled_with(zca_run):
    """`dvc repro -s prepare` with other preprocessing params, then `-s evaluate`: the stage's
    workflow.evaluate refuses in one line instead of scoring the set on differently mapped test
    images; a set claiming another dataset is refused too. The matching pair scores (the control)."""
    prepared, distilled = zca_run
    workflow.evaluate(distilled, prepared, EvaluateConfig(baseline_repeats=1))
    standardized = prepare(DIGITS, PreprocessConfig("standardize"), cache_dir=Path("/nonexistent"))
    with pytest.raises(UserError, match="distilled under preprocessing 'zca' .* the prepared data was mapped by "
                                        "'standardize'") as raised:
        workflow.evaluate(distilled, standardized, EvaluateConfig(baseline_repeats=1))
    assert "\n" not in str(raised.value)
    other = dict(distilled.metadata, dataset={**distilled.metadata["dataset"], "fingerprint": "0" * 64})
    with pytest.raises(UserError, match="distilled from a dataset with fingerprint 000000000000; the prepared data's is"):
        workflow.evaluate(dataclasses.replace(distilled, metadata=other), prepared, EvaluateConfig(baseline_repeats=1))
