"""The finite network's own NTK and the labels solved for it, against independent references:
neural-tangents' autodiff empirical NTK, a least-squares solve written out in numpy, and the
network itself trained in the kernel regime."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.data.prepared import prepare
from pipeline.distill import krr
from pipeline.errors import UserError
from pipeline.evaluate import finite, transfer
from pipeline.kernels import network_kernel
from pipeline.run.config import DataConfig, PreprocessConfig, TrainConfig


def _params(config: TrainConfig, shape=(4, 4, 1), classes=3, seed=0):
    model = finite.make_model(config, shape, classes)
    return model, model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *shape), jnp.float32))


@pytest.mark.exact
@pytest.mark.parametrize("kw", [dict(width=64, depth=1), dict(width=32, depth=3, b_std=0.5),
                                dict(width=48, depth=2, parameterization="standard")])
def test_closed_form_ntk_equals_neural_tangents_autodiff(kw):
    """Same parameters, same images: our per-layer closed form against nt's Jacobian contraction.
    Both are float32 sums of at most width * fan_in products of O(1) terms, so they agree to a few
    float32 ulps of the largest entry times sqrt(number of summands): sqrt(64 x 16) u = 1.9e-6
    for the largest layer, so 1e-5 relative is 5x that (measured <= 2e-7)."""
    import neural_tangents as nt

    config = TrainConfig(**kw)
    model, params = _params(config)
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(5, 4, 4, 1)).astype(np.float32), rng.normal(size=(7, 4, 4, 1)).astype(np.float32)
    reference = np.asarray(nt.empirical_ntk_fn(lambda p, x: model.apply(p, x), trace_axes=(), vmap_axes=0)(x1, x2, params))
    ours = network_kernel.empirical_ntk(config, params, x1, x2)
    assert ours.shape == reference.shape == (5, 7, 3, 3)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    off_diagonal = ours[..., 0, 1]
    assert np.abs(off_diagonal).max() > 1e-3 * np.abs(ours).max()  # outputs share hidden units at finite width


def test_solved_labels_minimise_the_kernel_regression_error():
    """Against the objective written out explicitly: A = Θ_ts (Θ_ss + ridge I)^-1 over (image, output)
    pairs, then numpy's least squares with the same ridge on the normal equations. Tolerance: both
    solve in float64 (n cond eps ~ 1e-13), but solve_labels computes its float32 kernel rows in
    blocks of 7 targets and the reference in one call, so entries may round differently, by
    ~sqrt(32) u = 3.4e-7 relative; K_ts enters G = K_st K_ts twice and cond(G + ridge) = 42:
    ~3e-5. rtol 1e-4 is 3x that (measured 5e-8: here the blocks round alike, and only the labels'
    final float32 rounding shows)."""
    config = TrainConfig(width=32)
    _, params = _params(config)
    rng = np.random.default_rng(1)
    support = rng.normal(size=(4, 4, 4, 1)).astype(np.float32)
    targets = rng.normal(size=(40, 4, 4, 1)).astype(np.float32)
    classes = rng.integers(0, 3, 40)
    reg = 1e-6
    solved = network_kernel.solve_labels(config, params, support, targets, classes, 3, reg, block=7)

    k_ss = network_kernel.empirical_ntk(config, params, support, support).transpose(0, 2, 1, 3).reshape(12, 12)
    k_ts = network_kernel.empirical_ntk(config, params, targets, support).transpose(0, 2, 1, 3).reshape(120, 12)
    ridge = lambda m: reg * np.trace(m) / len(m)  # noqa: E731  (krr.ridge's convention)
    a = k_ts @ np.linalg.inv(k_ss + ridge(k_ss) * np.eye(12))
    y_t = krr.centered_one_hot(classes, 3).astype(np.float64).reshape(-1)
    gram = k_ts.T @ k_ts
    z = np.linalg.solve(gram + ridge(gram) * np.eye(12), k_ts.T @ y_t)
    expected = ((k_ss + ridge(k_ss) * np.eye(12)) @ z).reshape(4, 3)
    np.testing.assert_allclose(solved, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    loss = lambda y: np.sum((y_t - a @ y.reshape(-1)) ** 2)  # noqa: E731
    assert loss(solved) < loss(krr.centered_one_hot(np.arange(4) % 3, 3))


def test_a_network_trained_on_solved_labels_is_its_kernel_regression():
    """The reason the labels are solved for the network's kernel: with centred MSE, a small label
    scale (lazy training) and enough full-batch steps, the trained network's outputs equal
    Θ_xs Θ_ss^-1 Y_s from its initial parameters. In the kernel regime the network departs from its
    linearisation by O(1/sqrt(width)) (Lee et al. 2019, Thm 2.1): 1/sqrt(2048) = 2.2 %, so a
    relative RMS difference of 10 % leaves a 4.5x constant; a network trained on other labels, or a
    kernel from other parameters, is off by order 100 %."""
    prepared = prepare(DataConfig("embedded", "digits"), PreprocessConfig("standardize"), cache_dir=Path("/nonexistent"))
    x, classes = prepared.x_train[:20], prepared.y_train[:20]
    config = TrainConfig(width=2048, labels="solved", label_scale=0.1, label_scale_choice="fixed",
                         optimizer_choice="fixed", steps=3000, learning_rate=0.5, batch_size=20, eval_every=0,
                         solve_targets=300)
    solve_on = transfer.solve_targets(prepared, config)
    result = finite.train(x, np.zeros((20, 10), np.float32), classes, prepared.x_val, prepared.y_val, 10, config, 7,
                          solve_on=solve_on)
    solved = finite.solved_labels(x, 10, config, 7, solve_on)
    _, params, _ = finite._init(config, x.shape[1:], 10, 7)
    k_ss = network_kernel.empirical_ntk(config, params, x, x).transpose(0, 2, 1, 3).reshape(200, 200)
    k_vs = network_kernel.empirical_ntk(config, params, prepared.x_val[:50], x).transpose(0, 2, 1, 3).reshape(500, 200)
    kernel_prediction = (k_vs @ np.linalg.solve(k_ss, solved.reshape(-1).astype(np.float64))).reshape(50, 10)
    network = result.predict(prepared.x_val[:50])
    relative = np.sqrt(np.mean((network - kernel_prediction) ** 2) / np.mean(kernel_prediction ** 2))
    print(f"relative RMS difference {relative:.4f}")
    assert relative < 0.10


def test_solved_labels_need_a_centred_fc_network():
    with pytest.raises(UserError, match="train.labels=solved .* needs train.loss=mse_centered"):
        TrainConfig(labels="solved", loss="xent")
    with pytest.raises(UserError, match="train.labels='learned' is not allowed"):
        TrainConfig(labels="learned")
    with pytest.raises(UserError, match="needs train.architecture=fc"):
        network_kernel.check_supported(TrainConfig(architecture="conv"))


def test_validation_chooses_among_both_label_sources():
    config = TrainConfig(labels_choice="validation")
    candidates = transfer.network_candidates(config)
    assert {c.labels for c in candidates} == {"support", "solved"}
    assert len(candidates) == 2 * len(transfer.network_candidates(dataclasses.replace(config, labels_choice="fixed")))
    assert candidates[0].labels == "support"  # the configured source wins ties
