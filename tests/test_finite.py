"""Finite networks: they train (tiny separable data -> 100 % train accuracy), their initial function
matches the infinite-width NNGP of the same parameterisation, and mismatches are clear errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import finite, kernels, workflow
from pipeline.artifacts import DistilledSet
from pipeline.config import KernelConfig, PreprocessConfig, TrainConfig
from pipeline.errors import UserError


def _separable(rng, pattern, n_per_class=8):
    """Two classes whose images differ in the sign of `pattern`, plus noise."""
    classes = np.repeat([0, 1], n_per_class)
    x = (np.where(classes == 0, 1.0, -1.0)[:, None, None, None] * pattern
         + 0.3 * rng.standard_normal((len(classes), *pattern.shape)))
    y = np.eye(2)[classes] - 0.5
    return x.astype(np.float32), y.astype(np.float32), classes


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(parameterization="ntk", optimizer="sgd", learning_rate=0.5, loss="mse"),
    dict(architecture="conv", conv_width=8, conv_depth=2, pooling="max"),
    dict(architecture="conv", conv_width=8, conv_depth=1, pooling="none", parameterization="ntk", loss="mse",
         optimizer="sgd", learning_rate=0.2, l2=1e-4),
])
def test_networks_fit_a_small_separable_set(rng, overrides):
    pattern = rng.standard_normal((8, 8, 1))
    x, y, classes = _separable(rng, pattern)
    x_test, _, classes_test = _separable(np.random.default_rng(5), pattern, n_per_class=50)
    config = TrainConfig(width=64, steps=200, batch_size=8, eval_every=100, **overrides)
    result = finite.train(x, y, classes, x_test, classes_test, 2, config, seed=0)
    assert result.train_accuracy == 1.0
    assert [p["step"] for p in result.curve] == [100, 200]
    assert result.test_accuracy > 0.9  # the sign of the pattern generalises to fresh draws


@pytest.mark.parametrize("architecture", ["fc", "conv"])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_wide_network_at_init_has_the_nngp_covariance(rng, architecture, parameterization):
    """Outputs of a wide ReLU net at init are Gaussian with covariance = the NNGP kernel of the same
    architecture (neural-tangents, itself checked against closed forms in test_kernels). A large
    b_std makes a mis-scaled bias visible."""
    x = rng.standard_normal((4, 4, 4, 1)).astype(np.float32)
    width = 3000 if architecture == "fc" else 600
    config = TrainConfig(architecture=architecture, width=width, depth=1, conv_width=width, conv_depth=1,
                         pooling="none", parameterization=parameterization, w_std=1.5, b_std=1.0)
    model = finite.make_model(config, (4, 4, 1), num_classes=2000)  # 2000 outputs: draws sharing the hidden layer
    empirical = np.zeros((4, 4))
    for seed in range(6):  # a few inits, so the shared hidden layer's fluctuation averages out too
        out = np.asarray(model.apply(model.init(jax.random.PRNGKey(seed), jnp.asarray(x)), jnp.asarray(x)), np.float64)
        empirical += out @ out.T / out.shape[1] / 6
    spec = KernelConfig(architecture=architecture, kind="nngp", depth=1, w_std=1.5, b_std=1.0, conv_readout="flatten")
    expected = np.asarray(kernels.make(spec)(x, x))
    # Without the bias (or with it scaled twice) entries move by b_std^2 = 1, i.e. 15-40 %.
    np.testing.assert_allclose(empirical, expected, rtol=0.07)


def test_conv_that_pools_images_away_is_refused():
    with pytest.raises(UserError, match=r"train.conv_depth=4 halves 8x8 images 4 times, below one pixel; expected train.conv_depth <= 3"):
        finite.make_model(TrainConfig(architecture="conv", conv_depth=4), (8, 8, 1), 10)


def _prepared(digits_standardized, digits, transform):
    from pipeline.prepared import Prepared

    x_train, y_train, x_test, y_test = digits_standardized
    return Prepared(x_train, y_train, x_test, y_test, transform, {"dataset": digits.describe()})


def test_transfer_refuses_an_artifact_of_another_shape_or_preprocessing(digits, digits_standardized):
    from pipeline import preprocess

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    prepared = _prepared(digits_standardized, digits, transform)
    small = DistilledSet(np.zeros((10, 4, 4, 1), np.float32), np.zeros((10, 10), np.float32),
                         np.arange(10, dtype=np.int32), transform, {})
    with pytest.raises(UserError, match=r"distilled images have shape \(4, 4, 1\) but the test images are \(8, 8, 1\)"):
        workflow.transfer(small, prepared, TrainConfig(steps=1, seeds=1))
    other = dataclasses.replace(small, images=np.zeros((10, 8, 8, 1), np.float32),
                                transform=preprocess.fit(PreprocessConfig("none"), digits.x_train))
    with pytest.raises(UserError, match="other preprocessing than the prepared test data"):
        workflow.transfer(other, prepared, TrainConfig(steps=1, seeds=1))


def test_transfer_reports_both_sides_over_seeds(digits, digits_standardized):
    from pipeline import preprocess
    from pipeline.kip import class_balanced_indices
    from pipeline.krr import centered_one_hot

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    prepared = _prepared(digits_standardized, digits, transform)
    idx = class_balanced_indices(prepared.y_train, 3, 10, np.random.default_rng(7))
    support = DistilledSet(prepared.x_train[idx], np.asarray(centered_one_hot(prepared.y_train[idx], 10)),
                           prepared.y_train[idx].astype(np.int32), transform, {})
    metrics, curve = workflow.transfer(support, prepared, TrainConfig(width=128, steps=60, eval_every=30, seeds=2))
    assert metrics["seeds"] == 2 and metrics["support_size"] == 30
    assert metrics["nn_train_accuracy"] == 1.0
    # 30 real digits train a network far above chance (10 %) on both sides
    assert metrics["nn_test_accuracy"] > 0.5 and metrics["nn_baseline_test_accuracy"] > 0.5
    assert [p["step"] for p in curve] == [30, 60]
