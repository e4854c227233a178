"""The random-feature ConvNet kernel: held to neural-tangents' exact NNGP within its Monte-Carlo
error, and to the finite ConvNet that `train.architecture=conv` trains."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.evaluate import finite
from pipeline.kernels import conv_features, functions as kernels
from pipeline.kernels.conv_features import ConvFeatureConfig
from pipeline.run.config import TrainConfig


def _per_network_kernels(config: ConvFeatureConfig, x: jax.Array, seed: int) -> np.ndarray:
    """(networks, n, n): each network's own empirical NNGP, from the blocks of the feature matrix."""
    params = conv_features.init(jax.random.PRNGKey(seed), config, x.shape[1:])
    f = np.asarray(conv_features.features(params, x, config), np.float64)
    m = config.networks
    block = f.shape[1] // m
    return np.stack([m * f[:, i * block:(i + 1) * block] @ f[:, i * block:(i + 1) * block].T
                     for i in range(m)]) + config.b_std ** 2


@pytest.mark.exact
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_estimate_is_within_its_monte_carlo_error_of_the_exact_nngp(depth):
    """The estimate averages `networks` i.i.d. per-network kernels, so its error is their standard
    error (estimated from the same 256 networks, to ~5 %) plus the finite-width bias of the mean,
    which is zero at depth 1 (first-layer pre-activations are exactly Gaussian) and O(1/width)
    deeper (Yaida 2020). We allow 5 standard errors plus |k|/width; measured here the error is
    under 2 standard errors at every depth (a scratch check), i.e. the bias is below the noise at width 64.
    Reference: neural-tangents' exact NNGP (kernels.exact_conv_kernel_fn). The last line is a
    consistency check: conv_features.kernel (a float32 f f^T) against the float64 mean of the same
    draw's per-network kernels. A float32 sum of F nonnegative products rounds by ~sqrt(F) u
    (probabilistic bound), <= 3.1e-5 relative at depth 1 (F = 262,144); rtol 1e-4 is 3x that
    (measured 4.9e-7)."""
    config = ConvFeatureConfig(width=64, depth=depth, networks=256)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8, 8, 1)).astype(np.float32))
    per_network = _per_network_kernels(config, x, seed=3)
    estimate = per_network.mean(0)
    standard_error = per_network.std(0, ddof=1) / np.sqrt(config.networks)
    exact = np.asarray(kernels.exact_conv_kernel_fn(config)(x, x), np.float64)
    allowed = 5 * standard_error + (0 if depth == 1 else np.abs(exact) / config.width)
    assert np.all(np.abs(estimate - exact) <= allowed), np.abs(estimate - exact) / standard_error
    np.testing.assert_allclose(np.asarray(conv_features.kernel(
        conv_features.init(jax.random.PRNGKey(3), config, x.shape[1:]), x, x, config)), estimate, rtol=1e-4, atol=1e-6)


@pytest.mark.exact
def test_a_wrong_kernel_is_caught():
    """The check above has power: the NNGP of a network with another weight scale (w_std 1.2
    instead of sqrt 2, a 28 % smaller kernel) fails it."""
    config = ConvFeatureConfig(width=64, depth=2, networks=256)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8, 8, 1)).astype(np.float32))
    per_network = _per_network_kernels(config, x, seed=3)
    standard_error = per_network.std(0, ddof=1) / np.sqrt(config.networks)
    wrong = np.asarray(kernels.exact_conv_kernel_fn(dataclasses.replace(config, w_std=1.2))(x, x), np.float64)
    assert np.any(np.abs(per_network.mean(0) - wrong) > 5 * standard_error + np.abs(wrong) / config.width)


def test_features_are_the_finite_convnets_last_block():
    """The finite ConvNet `train.architecture=conv` trains, with the same parameters, outputs its
    readout applied to exactly these features: the kernel is that network's NNGP. Consistency
    check between two of our modules (finite's network and conv_features, each computing the
    convolutions its own way), not an external reference. Tolerance: the float32 readout is a
    length-64 sum with sum |f w| <= 4.6, ~sqrt(64) u x 4.6 = 2.2e-6 (probabilistic bound; 1.7e-5
    worst case), plus the convolutions' rounding; atol 1e-5 is ~5x the former (measured 1.1e-7)."""
    train = TrainConfig(architecture="conv", conv_width=16, conv_depth=2, pooling="avg", parameterization="ntk")
    config = ConvFeatureConfig(width=16, depth=2, networks=1, w_std=train.w_std, b_std=train.b_std)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8, 8, 1)).astype(np.float32))
    network = finite.make_model(train, (8, 8, 1), 3)
    params = network.init(jax.random.PRNGKey(0), x[:1])
    body = {"params": {k: v for k, v in params["params"].items() if k.startswith("ScaledConv")}}
    stacked = jax.tree_util.tree_map(lambda a: a[None], body)
    f = np.asarray(conv_features.features(stacked, x, config), np.float64)
    readout = params["params"]["ScaledDense_0"]
    # the readout: (w_std / sqrt(F)) h @ W + b_std * b, and f = (w_std / sqrt(F)) h
    expected = f @ np.asarray(readout["kernel"], np.float64) + train.b_std * np.asarray(readout["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(network.apply(params, x)), expected, rtol=1e-5, atol=1e-5)


def test_feature_rows_match_one_pass():
    """Consistency check, not a reference: feature_rows' padded blocks against one pass. The same
    float32 convolutions compiled for two shapes may sum each patch in another order: up to
    72 u = 4.3e-6 relative for layer 2's 3 x 3 x 8 patches (worst case); rtol 1e-5 is 2x that
    (measured 3e-8 against features up to 0.29, 2 ulps), while a misplaced or padded-in row is
    off by O(1)."""
    config = ConvFeatureConfig(width=8, depth=2, networks=2)
    x = np.random.default_rng(2).standard_normal((7, 8, 8, 1)).astype(np.float32)
    params = conv_features.init(jax.random.PRNGKey(0), config, x.shape[1:])
    np.testing.assert_allclose(conv_features.feature_rows(params, x, config, block_size=3),
                               np.asarray(conv_features.features(params, jnp.asarray(x), config)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value", [("width", 0), ("depth", 1.5), ("networks", True), ("w_std", -1.0), ("b_std", -0.1)])
def test_bad_settings_name_the_parameter(field, value):
    with pytest.raises(UserError, match=f"conv_features.{field}"):
        ConvFeatureConfig(**{field: value})


def test_too_deep_for_the_image_is_refused():
    with pytest.raises(UserError, match=r"conv_features.depth=4 .* expected conv_features.depth <= 3"):
        conv_features.init(jax.random.PRNGKey(0), ConvFeatureConfig(depth=4), (8, 8, 1))
