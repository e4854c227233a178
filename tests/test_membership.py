"""Membership inference (pipeline/evaluate/membership.py): the AUC against the pairwise definition,
its value where the answer is known, and the attacks on supports whose membership is known."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.prepared import prepare
from pipeline.distill import krr
from pipeline.evaluate import membership
from pipeline.kernels import functions as kernels
from pipeline.run.config import DataConfig, KernelConfig, PreprocessConfig


def _pairwise_auc(members: np.ndarray, others: np.ndarray) -> float:
    """The definition, over every (member, non-member) pair: 1 if the member scores higher, 1/2 if tied."""
    m, n = members[:, None], others[None, :]
    return float(np.mean((m > n) + 0.5 * (m == n)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_is_the_pairwise_probability_ties_counted_half(seed):
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 6, size=37).astype(float)  # few values: many ties, within and across the groups
    others = rng.integers(0, 8, size=53).astype(float)
    assert membership.auc(members, others) == pytest.approx(_pairwise_auc(members, others), abs=1e-12)


def test_auc_at_the_known_ends_and_for_indistinguishable_scores():
    assert membership.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert membership.auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert membership.auc(np.ones(5), np.ones(7)) == 0.5
    # One distribution for both groups: the AUC's standard deviation is sqrt((n_m + n_n + 1) / (12 n_m n_n))
    # (Mann-Whitney under the null), 0.0065 at 2000 each; 5 of them bound a fixed draw's distance from 1/2.
    rng = np.random.default_rng(7)
    n = 2000
    value = membership.auc(rng.standard_normal(n), rng.standard_normal(n))
    assert abs(value - 0.5) < 5 * np.sqrt((2 * n + 1) / (12 * n * n))
    with pytest.raises(ValueError, match="at least one member"):
        membership.auc(np.array([]), np.array([1.0]))


@pytest.fixture(scope="module")
def digits():
    return prepare(DataConfig("embedded", "digits"), PreprocessConfig("standardize"), cache_dir=Path("/nonexistent"))


def test_a_support_of_the_members_themselves_is_found_out_by_both_attacks(digits):
    """Support = the member sample: each member is at distance 0 from the support and, KRR interpolating
    at reg 1e-6, predicted almost exactly; held-out images are neither, so both AUCs are 1."""
    kernel_fn = kernels.make(KernelConfig())
    rng = np.random.default_rng(0)
    members = rng.choice(len(digits.y_train), size=100, replace=False)
    others = rng.choice(len(digits.y_val), size=100, replace=False)
    support = digits.x_train[members]
    labels = krr.centered_one_hot(digits.y_train[members], digits.num_classes)
    candidates = np.concatenate([support, digits.x_val[others]])
    classes = np.concatenate([digits.y_train[members], digits.y_val[others]])
    scores = membership.attack_scores(kernel_fn, support, labels, candidates, classes, digits.num_classes, 1e-6)
    assert np.all(scores["distance"][:100] == 0) and np.all(scores["distance"][100:] < 0)
    assert membership.auc(scores["distance"][:100], scores["distance"][100:]) == 1.0
    assert membership.auc(scores["loss"][:100], scores["loss"][100:]) == 1.0


def test_a_support_unrelated_to_the_training_images_gives_the_attacks_nothing(digits):
    """Noise images with random labels carry no information about which images were members: both
    AUCs stay within 5 standard deviations of 1/2 (140 members and 140 non-members: 0.034 each)."""
    kernel_fn = kernels.make(KernelConfig())
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((40,) + digits.x_train.shape[1:]).astype(np.float32)
    labels = krr.centered_one_hot(rng.integers(0, digits.num_classes, 40), digits.num_classes)
    result = membership.report(kernel_fn, noise, labels, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                               digits.num_classes, 1e-6, seed=0)
    n = result["members"]
    assert n == result["non_members"] == len(digits.y_val)  # the held-out split is the smaller one here
    bound = 5 * np.sqrt((2 * n + 1) / (12 * n * n))
    assert abs(result["loss_auc"] - 0.5) < bound and abs(result["distance_auc"] - 0.5) < bound
    again = membership.report(kernel_fn, noise, labels, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                              digits.num_classes, 1e-6, seed=0)
    assert again == result  # the same draw for the same seed
