"""KIP against finite networks' kernels (`finite_ntk.FiniteNetworkKernel`): the kernel is the
network's own NTK (held to neural-tangents through network_kernel), its prediction is kernel
regression written out in float64 numpy, and KIP with it helps an unseen network's kernel. The
engine's guarantees are tests/test_engine.py's, run for this kernel among the others."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.distill import kip, krr
from pipeline.errors import UserError
from pipeline.evaluate import finite
from pipeline.kernels import finite_ntk, network_kernel
from pipeline.run.config import DistillConfig, TrainConfig

NETWORK = TrainConfig(width=64, depth=1)


def _params(shape=(8, 8, 1), classes=10, seed=0):
    model = finite.make_model(NETWORK, shape, classes)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *shape), jnp.float32))


def test_kernel_matrix_is_the_network_ntk_over_image_output_pairs():
    """Row (i, a), column (j, b) is Θ_ab(x_i, x_j): the layout the solve relies on. Same float32
    computation as network_kernel.empirical_ntk, so they agree to rounding. Consistency check
    against network_kernel (which is held to neural-tangents); measured bit-identical. atol 1e-6
    of the largest entry allows the float32 sums over width 64 and fan-in 64 in another order
    (~sqrt(64) u = 4.8e-7 each, probabilistic bound), while a wrong layout is off by O(1)."""
    params = _params()
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(3, 8, 8, 1)).astype(np.float32), rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    reference = network_kernel.empirical_ntk(NETWORK, params, x1, x2)  # (3, 4, 10, 10)
    ours = np.asarray(finite_ntk.kernel_matrix(NETWORK, params, jnp.asarray(x1), jnp.asarray(x2)))
    assert ours.shape == (30, 40)
    np.testing.assert_allclose(ours, reference.transpose(0, 2, 1, 3).reshape(30, 40), rtol=0,
                               atol=1e-6 * np.abs(reference).max())


def test_predict_is_kernel_regression_with_the_networks_ntk():
    """Against Θ_xs (Θ_ss + ridge I)^-1 y_s in float64 numpy. With ridge 1e-2 of the mean diagonal
    the system's condition number is at most 1 + n/reg = 6001 (9.5 for these images), so the
    float32 solve's n cond u is <= 3.4e-5 relative in alpha here, and the predictions carry that
    times |Θ_xs| |alpha| / |prediction| = 7: 2.4e-4 of the largest prediction; 3e-3 is 12x that,
    leaving room for the kernel's own rounding (measured 4e-7)."""
    params = _params()
    rng = np.random.default_rng(1)
    x_s, x = rng.normal(size=(6, 8, 8, 1)).astype(np.float32), rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
    y_s = rng.normal(size=(6, 10)).astype(np.float32)
    reg = 1e-2
    k_ss = network_kernel.empirical_ntk(NETWORK, params, x_s, x_s).transpose(0, 2, 1, 3).reshape(60, 60)
    k_xs = network_kernel.empirical_ntk(NETWORK, params, x, x_s).transpose(0, 2, 1, 3).reshape(50, 60)
    expected = (k_xs @ np.linalg.solve(k_ss + reg * np.trace(k_ss) / 60 * np.eye(60), y_s.reshape(-1).astype(np.float64))).reshape(5, 10)
    ours = np.asarray(finite_ntk.predict(NETWORK, params, jnp.asarray(x_s), jnp.asarray(y_s), jnp.asarray(x), reg))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-3 * np.abs(expected).max())


@pytest.fixture(scope="module")
def digits_split(digits_standardized):
    x, y, _, _ = digits_standardized
    return x[300:], y[300:], x[:300], y[:300]  # train, validation (the test split is never passed)


def _start(x_train, y_train, per_class=2):
    idx = np.concatenate([np.flatnonzero(y_train == c)[:per_class] for c in range(10)])
    return x_train[idx].astype(np.float32), np.asarray(krr.centered_one_hot(y_train[idx], 10), np.float32)


def test_kip_against_fresh_networks_helps_an_unseen_networks_kernel(digits_split):
    """Started from 20 real digits, images and labels learned against a fresh network's kernel
    every step, the best validation step is kept."""
    x_train, y_train, x_val, y_val = digits_split
    images, labels = _start(x_train, y_train)
    config = DistillConfig(steps=40, learning_rate=0.02, target_batch=200, eval_every=10, reg=1e-5, learn_labels=True,
                           keep="best_validation", checkpoint_every=0)
    kernel = finite_ntk.FiniteNetworkKernel(NETWORK, (8, 8, 1), 10, seed=0)
    result = kip.distill(x_train, y_train, 10, kernel, config, progress=False, monitor=kernel.monitor(x_val, y_val, config.reg),
                         start=(images, labels, np.argmax(labels, axis=1)))
    scored = {p["step"]: p["val_accuracy"] for p in result.history if "val_accuracy" in p}
    assert sorted(scored) == [0, 10, 20, 30, 40]
    assert result.best_step == max(scored, key=lambda step: (scored[step], -step))
    # Learning against fresh networks' kernels helps an unseen network's kernel on held-out images:
    # 20 real digits start at 65-66 % and reach 88-92 % by step 40 (seeds 0-2 of this setting); a
    # 10-point bar is more than 4 standard errors of a 300-image accuracy below the smallest gain.
    assert scored[result.best_step] > scored[0] + 0.10
    assert [p["loss"] for p in result.history[1:]][-1] < result.history[1]["loss"]


def test_a_network_without_a_closed_form_kernel_is_refused():
    with pytest.raises(UserError, match="needs train.architecture=fc"):
        finite_ntk.FiniteNetworkKernel(TrainConfig(architecture="conv"), (8, 8, 1), 10, seed=0)
