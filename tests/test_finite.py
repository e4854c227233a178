"""Finite networks: they train (tiny separable data -> 100 % train accuracy), their initial function
matches the infinite-width NNGP of the same parameterisation, and mismatches are clear errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.artifacts.npz import DistilledSet
from pipeline.errors import UserError
from pipeline.evaluate import finite, transfer
from pipeline.kernels import functions as kernels
from pipeline.run import workflow
from pipeline.run.config import KernelConfig, PreprocessConfig, TrainConfig


def _separable(rng, pattern, n_per_class=8):
    """Two classes whose images differ in the sign of `pattern`, plus noise."""
    classes = np.repeat([0, 1], n_per_class)
    x = (np.where(classes == 0, 1.0, -1.0)[:, None, None, None] * pattern
         + 0.3 * rng.standard_normal((len(classes), *pattern.shape)))
    y = np.eye(2)[classes] - 0.5
    return x.astype(np.float32), y.astype(np.float32), classes


_XENT_ADAM = dict(loss="xent", optimizer="adam", learning_rate=1e-3, parameterization="standard")


@pytest.mark.parametrize("overrides", [
    dict(),  # the defaults: centred MSE, ntk, SGD
    _XENT_ADAM,
    dict(parameterization="ntk", optimizer="sgd", learning_rate=0.5, loss="mse", label_scale=1.0),
    dict(architecture="conv", conv_width=8, conv_depth=2, pooling="max", **_XENT_ADAM),
    dict(architecture="conv", conv_width=8, conv_depth=1, pooling="none", parameterization="ntk", loss="mse",
         optimizer="sgd", learning_rate=0.2, l2=1e-4, label_scale=1.0),
    dict(parameterization="ntk", optimizer="sgd", learning_rate=0.5, loss="mse_centered", label_scale=1.0),
    dict(loss="soft_xent", temperature=0.1, optimizer="adam", learning_rate=1e-3, parameterization="standard"),
])
def test_networks_fit_a_small_separable_set(rng, overrides):
    pattern = rng.standard_normal((8, 8, 1))
    x, y, classes = _separable(rng, pattern)
    x_test, _, classes_test = _separable(np.random.default_rng(5), pattern, n_per_class=50)
    config = TrainConfig(width=64, steps=200, batch_size=8, eval_every=100, **overrides)
    result = finite.train(x, y, classes, x_test, classes_test, 2, config, seed=0)
    assert result.train_accuracy == 1.0
    assert [p["step"] for p in result.curve] == [100, 200]
    assert result.accuracy > 0.9  # the sign of the pattern generalises to fresh draws


@pytest.mark.parametrize("architecture", ["fc", pytest.param("conv", marks=pytest.mark.exact)])  # conv: neural-tangents' NNGP
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_wide_network_at_init_has_the_nngp_covariance(rng, architecture, parameterization):
    """Outputs of a wide ReLU net at init are Gaussian with covariance = the NNGP kernel of the same
    architecture (neural-tangents, itself checked against closed forms in test_kernels). A large
    b_std makes a mis-scaled bias visible. Reference: kernels.make's NNGP (fc: our closed form, held
    to neural-tangents; conv: neural-tangents'). Monte-Carlo error, estimated from 40 (fc) and 24
    (conv) inits: unbiased (their mean is within 1.5 standard errors), and the 6-init mean's
    standard error is 1.8-2.7 % (fc) and 2.0-2.9 % (conv) of each entry. rtol 0.12 is 4 standard
    errors on the worst entries (this draw's largest errors: 6.8 % fc, 3.4 % conv), well below what a
    wrong bias does: a missing or doubled bias moves entries by 15-40 %."""
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
    np.testing.assert_allclose(empirical, expected, rtol=0.12)


def test_conv_that_pools_images_away_is_refused():
    with pytest.raises(UserError, match=r"train.conv_depth=4 halves 8x8 images 4 times, below one pixel; expected train.conv_depth <= 3"):
        finite.make_model(TrainConfig(architecture="conv", conv_depth=4), (8, 8, 1), 10)


def _prepared(digits_standardized, digits, transform):
    from pipeline.data.prepared import Prepared

    x_train, y_train, x_test, y_test = digits_standardized
    return Prepared(x_train[:-200], y_train[:-200], x_train[-200:], y_train[-200:], x_test, y_test, transform,
                    {"dataset": digits.describe()})


def test_transfer_refuses_an_artifact_of_another_shape_or_preprocessing(digits, digits_standardized):
    from pipeline.data import preprocess

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    prepared = _prepared(digits_standardized, digits, transform)
    small = DistilledSet(np.zeros((10, 4, 4, 1), np.float32), np.zeros((10, 10), np.float32),
                         np.arange(10, dtype=np.int32), transform, {"dataset": digits.describe()})
    with pytest.raises(UserError, match=r"distilled images have shape \(4, 4, 1\) but the test images are \(8, 8, 1\)"):
        transfer.transfer(small, prepared, TrainConfig(steps=1, seeds=1))
    other = dataclasses.replace(small, images=np.zeros((10, 8, 8, 1), np.float32),
                                transform=preprocess.fit(PreprocessConfig("none"), digits.x_train))
    with pytest.raises(UserError, match="distilled under preprocessing"):
        transfer.transfer(other, prepared, TrainConfig(steps=1, seeds=1))


def test_transfer_reports_both_sides_over_seeds(digits, digits_standardized):
    from pipeline.data import preprocess
    from pipeline.distill.kip import class_balanced_indices
    from pipeline.distill.krr import centered_one_hot

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    prepared = _prepared(digits_standardized, digits, transform)
    idx = class_balanced_indices(prepared.y_train, 3, 10, np.random.default_rng(7))
    support = DistilledSet(prepared.x_train[idx], np.asarray(centered_one_hot(prepared.y_train[idx], 10)),
                           prepared.y_train[idx].astype(np.int32), transform, {"dataset": digits.describe()})
    metrics, curve = transfer.transfer(support, prepared, TrainConfig(width=128, steps=60, eval_every=30, seeds=2,
                                                                      optimizer_choice="fixed"))
    assert metrics["seeds"] == 2 and metrics["support_size"] == 30
    assert metrics["nn_train_accuracy"] == 1.0
    # 30 real digits train a network far above chance (10 %) on both sides
    assert metrics["nn_test_accuracy"] > 0.5 and metrics["nn_baseline_test_accuracy"] > 0.5
    assert [p["step"] for p in curve] == [30, 60]
    assert metrics["nn_optimizer"] == "sgd 0.5 x 60 steps"
    # the final networks on validation: the curve's last point is the same networks, the same images
    assert metrics["nn_val_accuracy"] == pytest.approx(curve[-1]["distilled_val_accuracy"], abs=1e-12)
    assert metrics["nn_baseline_val_accuracy"] == pytest.approx(curve[-1]["baseline_val_accuracy"], abs=1e-12)
    assert metrics["nn_labels"] == metrics["nn_baseline_labels"] == "support"  # labels_choice fixed: their own


def test_validation_accuracy_of_a_trained_network_is_its_monitor_at_the_last_step(digits, digits_standardized):
    """Two paths to the same number: the training loop's own monitor (every eval_every steps, on the
    validation split) and `transfer.validation_accuracy` from the returned network afterwards."""
    from pipeline.data import preprocess

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    prepared = _prepared(digits_standardized, digits, transform)
    idx = np.arange(40)
    result = finite.train(prepared.x_train[idx], np.eye(10, dtype=np.float32)[prepared.y_train[idx]],
                          prepared.y_train[idx], prepared.x_test, prepared.y_test, 10,
                          TrainConfig(width=64, steps=20, eval_every=20), 0, monitor=(prepared.x_val, prepared.y_val))
    assert transfer.validation_accuracy(result, prepared) == result.curve[-1]["val_accuracy"]
    assert 0.3 < result.curve[-1]["val_accuracy"] < 1.0  # trained, and scored on images it did not see
    no_validation = dataclasses.replace(prepared, x_val=prepared.x_val[:0], y_val=prepared.y_val[:0])
    with pytest.raises(UserError, match="data.validation_fraction > 0"):
        transfer.validation_accuracy(result, no_validation)


def test_sides_that_chose_different_optimizers_keep_their_own_curve_points(digits, digits_standardized):
    """One side on SGD for 60 steps, the other on Adam for 1000: each row holds the sides evaluated there."""
    results = {side: [finite.TrainResult(0.5, 1.0, [{"step": s, "train_loss": 0.1, "val_accuracy": v + seed}
                                                  for s, v in points]) for seed in (0.0, 0.1)]
               for side, points in (("distilled", [(30, 0.2), (60, 0.4)]), ("baseline", [(30, 0.3), (1000, 0.5)]))}
    assert transfer._mean_curve(results["distilled"]) == pytest.approx({30: 0.25, 60: 0.45})
    assert transfer._mean_curve(results["baseline"]) == pytest.approx({30: 0.35, 1000: 0.55})
    assert transfer._mean_curve([]) == {}


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_centring_makes_the_initial_output_exactly_zero(rng, parameterization):
    """mse_centered trains f(x) - f_0(x): at init that is 0.0 exactly, on any images, not just small."""
    x = rng.standard_normal((5, 6, 6, 1)).astype(np.float32)
    config = TrainConfig(width=256, parameterization=parameterization, loss="mse_centered")
    model = finite.make_model(config, (6, 6, 1), num_classes=3)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert np.abs(np.asarray(model.apply(params, jnp.asarray(x)))).max() > 0.1  # the uncentred net is not zero
    out = np.asarray(finite.centered_apply(model.apply)(params, params, jnp.asarray(x)))
    assert (out == 0.0).all()
    # one step of training from there: train() reports outputs of the centred network
    y = rng.standard_normal((5, 3)).astype(np.float32)
    result = finite.train(x, y, np.zeros(5, int), x, np.zeros(5, int), 3,
                          dataclasses.replace(config, optimizer="sgd", learning_rate=1e-6, steps=1, eval_every=0), seed=0)
    assert np.abs(result.predict(x)).max() < 1e-3


def _tiny_regression(rng):
    x = rng.standard_normal((8, 4, 4, 1)).astype(np.float32)
    x_test = rng.standard_normal((16, 4, 4, 1)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    return x, y, x_test


def _trained_outputs(x, y, x_test, width, loss, seed):
    """Full-batch gradient descent, no momentum, step 0.5, 1000 steps. The eigenvalues of Theta/n are
    0.22-2.54 here, so the step is below 2/2.54 (a step above it, 1.0, still fits the data but through a
    catapult out of the kernel regime, 0.6 away from the kernel prediction) and the slowest direction
    decays as (1 - 0.5 * 0.22)^1000: the data are interpolated."""
    config = TrainConfig(width=width, parameterization="ntk", w_std=1.5, b_std=0.5, loss=loss, label_scale=1.0, optimizer="sgd",
                         momentum=0.0, learning_rate=0.5, steps=1000, batch_size=len(x), eval_every=0)
    result = finite.train(x, y, np.zeros(len(x), int), x_test, np.zeros(len(x_test), int), 2, config, seed)
    np.testing.assert_allclose(result.predict(x), y, atol=1e-3)
    return result.predict(x_test)


def test_wide_centred_ntk_network_trained_on_mse_approaches_the_ntk_regression(rng):
    """In the kernel regime a centred network trained by gradient descent on MSE converges to kernel
    regression with its NTK, without the random initial function. Reference: the infinite-width NTK of
    pipeline.kernels.functions (checked against neural-tangents and closed forms in test_kernels) with a
    negligible ridge. The finite-width error shrinks as 1/sqrt(width): on this problem, over init seeds
    0-2, 0.26-0.34 at width 64, 0.10-0.14 at 512, 0.028-0.050 at 4096 (relative L2 error of the test
    predictions), so 0.1 at width 4096 is twice the largest seen, and width 64 fails it. The uncentred
    network misses by 2-3x the size of the prediction: its initial function is as large as the targets."""
    from pipeline.distill import krr

    x, y, x_test = _tiny_regression(rng)
    kernel_fn = kernels.make(KernelConfig(kind="ntk", depth=1, w_std=1.5, b_std=0.5, parameterization="ntk"))
    alpha = krr.fit(kernel_fn(x, x), jnp.asarray(y), 1e-9)
    reference = np.asarray(krr.predict(kernel_fn(x_test, x), alpha))

    def error(width, loss, seed=0):
        out = _trained_outputs(x, y, x_test, width, loss, seed)
        return np.linalg.norm(out - reference) / np.linalg.norm(reference)

    assert error(4096, "mse_centered") < 0.1
    assert error(64, "mse_centered") > 0.1  # the tolerance is tight enough to see finite width
    assert error(4096, "mse") > 1.0  # and centring is what makes the difference


def test_soft_xent_targets_are_the_tempered_softmax_of_the_labels():
    """Reference: the softmax written out in NumPy. Both are float32: exp of arguments up to 4 and
    a 3-term sum round by a few u each (~8 u = 5e-7 relative in all); rtol 1e-6 is 2x that, while
    a wrong temperature or axis is off by O(1)."""
    labels = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    targets = finite.training_targets(labels, TrainConfig(loss="soft_xent", temperature=0.5))
    expected = np.exp(labels / 0.5) / np.exp(labels / 0.5).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    np.testing.assert_array_equal(finite.training_targets(labels, TrainConfig(loss="mse_centered", label_scale=1.0)), labels)
    scaled = TrainConfig(loss="mse_centered", label_scale=10.0)
    np.testing.assert_allclose(finite.training_targets(labels, scaled), 10.0 * labels)
    # xent reads the classes; soft_xent has its temperature: label_scale leaves both alone
    np.testing.assert_allclose(finite.training_targets(labels, TrainConfig(loss="soft_xent", temperature=0.5, label_scale=10.0)),
                               expected, rtol=1e-6)


def test_label_scale_fits_scaled_labels_and_reports_outputs_on_the_labels_scale(rng):
    """label_scale s fits s * y; predictions are divided back by s, so they match y on the support."""
    pattern = rng.standard_normal((8, 8, 1))
    x, y, classes = _separable(rng, pattern)
    config = TrainConfig(width=64, steps=300, batch_size=16, eval_every=0, parameterization="ntk", optimizer="sgd",
                         learning_rate=0.1, loss="mse_centered", label_scale=3.0)
    result = finite.train(x, y, classes, x, classes, 2, config, seed=0)
    np.testing.assert_allclose(result.predict(x), y, atol=1e-2)


@pytest.mark.parametrize("overrides, message", [
    (dict(loss="hinge"), "train.loss='hinge' is not allowed; expected one of: mse|xent|mse_centered|soft_xent"),
    (dict(temperature=0.0), "train.temperature=0.0 is not allowed; expected a positive finite number"),
    (dict(temperature=float("inf")), "train.temperature=inf is not allowed; expected a positive finite number"),
    (dict(temperature="1"), "train.temperature='1' is not allowed; expected a positive finite number"),
    (dict(label_scale=-1.0), "train.label_scale=-1.0 is not allowed; expected a positive finite number"),
])
def test_train_options_are_validated(overrides, message):
    with pytest.raises(UserError) as caught:
        TrainConfig(**overrides)
    assert str(caught.value) == message and "\n" not in str(caught.value)


def test_the_label_scale_and_optimizer_are_chosen_on_validation_per_side(digits, monkeypatch):
    """label_scale_choice and optimizer_choice = validation: the (scale, optimizer) whose network scores
    best on the validation split, checked against training each candidate directly; fixed keeps
    train.label_scale and the configured optimizer. The choice checked is the one train_networks
    makes for the distilled side (recorded, not swept a second time)."""
    from pathlib import Path

    from pipeline.data.prepared import prepare
    from pipeline.run.config import AUTO_LABEL_SCALES, AUTO_OPTIMIZER, DataConfig, DistillConfig

    prepared = prepare(DataConfig("embedded", "digits"), PreprocessConfig("standardize"), cache_dir=Path("/x"))
    distilled = workflow.distill(prepared, KernelConfig(), DistillConfig(support_per_class=2, steps=5, target_batch=400,
                                 eval_every=0, checkpoint_every=0, learn_labels=True), progress=False).distilled
    config = TrainConfig(width=64, steps=50, seeds=1, eval_every=0)
    choices, choose = [], transfer.choose_network_settings
    monkeypatch.setattr(transfer, "choose_network_settings", lambda x, y, classes, *args, **kwargs: choices.append(
        ((x, y, classes, *args), choose(x, y, classes, *args, **kwargs))) or choices[-1][1])
    runs = transfer.train_networks(distilled, prepared, config, progress=False)
    monkeypatch.undo()
    assert len(choices) == 2  # the distilled side, then the baseline side
    (x, y, classes, on, with_config), chosen = choices[0]
    assert np.array_equal(x, distilled.images) and np.array_equal(y, distilled.labels)
    assert np.array_equal(classes, distilled.classes) and on is prepared and with_config == config
    direct = {}
    for optimizer in ({}, {**AUTO_OPTIMIZER, "momentum": 0.0}):
        for scale in AUTO_LABEL_SCALES:
            candidate = dataclasses.replace(config, label_scale=scale, **optimizer)
            try:
                direct[candidate] = finite.train(distilled.images, distilled.labels, distilled.classes, prepared.x_val,
                                                 prepared.y_val, 10, candidate, config.seed * 1000 + 999).accuracy
            except UserError:
                pass
    assert len(direct) >= 4  # most candidates train, so the choice is a real one
    assert chosen == max(direct, key=direct.get)
    fixed = dataclasses.replace(config, label_scale_choice="fixed", optimizer_choice="fixed", label_scale=3.0)
    assert transfer.choose_network_settings(distilled.images, distilled.labels, distilled.classes, prepared, fixed) == fixed
    only_scale = dataclasses.replace(config, optimizer_choice="fixed")
    assert {c.optimizer for c in transfer.network_candidates(only_scale)} == {"sgd"}
    assert runs["settings"]["distilled"] == transfer.settings_summary(chosen)
    assert runs["label_scale"]["distilled"] == chosen.label_scale and runs["label_scale"]["baseline"] in AUTO_LABEL_SCALES
