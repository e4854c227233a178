"""The KIP loop: its gradient, its determinism, resume, divergence, and that it learns."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import enable_x64

from pipeline import evaluate, kernels, kip, krr
from pipeline.config import DistillConfig, KernelConfig

SMALL = DistillConfig(support_per_class=2, steps=30, learning_rate=0.02, target_batch=300, checkpoint_every=10)


@pytest.mark.parametrize("spec", [KernelConfig(), KernelConfig(kind="nngp", depth=2), KernelConfig(architecture="rbf")],
                         ids=["fc-ntk", "fc-nngp-2", "rbf"])
@pytest.mark.parametrize("wrt", ["images", "labels"])
def test_gradient_matches_central_differences(rng, spec, wrt):
    kernel_fn = kernels.make(spec)
    with enable_x64():
        x_s = jnp.asarray(rng.standard_normal((5, 3, 3, 1)))
        y_s = jnp.asarray(rng.standard_normal((5, 2)))
        x_t = jnp.asarray(rng.standard_normal((20, 3, 3, 1)))
        y_t = jnp.asarray(rng.standard_normal((20, 2)))

        def loss(images, labels):
            return kip.kip_loss(kernel_fn, 1e-3, kip.Support(images, labels), x_t, y_t)

        argnum = 0 if wrt == "images" else 1
        point = [x_s, y_s]
        grad = np.asarray(jax.grad(loss, argnums=argnum)(x_s, y_s))
        # neural-tangents' safe arccos/sqrt clip at tiny tolerances, which puts ~1e-9 steps in the
        # loss; a 1e-4 central difference steps over them and is still O(1e-8) accurate.
        eps = 1e-4
        for flat_index in rng.choice(point[argnum].size, size=6, replace=False):
            index = np.unravel_index(flat_index, point[argnum].shape)
            plus, minus = list(point), list(point)
            plus[argnum] = point[argnum].at[index].add(eps)
            minus[argnum] = point[argnum].at[index].add(-eps)
            numeric = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
            assert grad[index] == pytest.approx(numeric, rel=1e-4, abs=1e-9)


def run(data, config, **kwargs):
    x_train, y_train, _, _ = data
    return kip.distill(x_train, y_train, 10, kernels.make(KernelConfig()), config, progress=False, **kwargs)


def test_same_seed_same_support_bit_for_bit(digits_standardized):
    first = run(digits_standardized, SMALL)
    second = run(digits_standardized, SMALL)
    assert first.images.tobytes() == second.images.tobytes()
    assert first.labels.tobytes() == second.labels.tobytes()
    other = run(digits_standardized, dataclasses.replace(SMALL, seed=1))
    assert other.images.tobytes() != first.images.tobytes()


def test_resume_from_checkpoint_is_bit_identical(digits_standardized, tmp_path):
    checkpoint = tmp_path / "kip.ckpt.npz"
    reference = run(digits_standardized, SMALL)
    run(digits_standardized, dataclasses.replace(SMALL, steps=20), checkpoint=checkpoint, checkpoint_key="k")
    resumed = run(digits_standardized, SMALL, checkpoint=checkpoint, checkpoint_key="k")
    assert resumed.images.tobytes() == reference.images.tobytes()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]


def test_checkpoint_of_other_params_is_ignored(digits_standardized, tmp_path):
    checkpoint = tmp_path / "kip.ckpt.npz"
    run(digits_standardized, dataclasses.replace(SMALL, steps=20, learning_rate=0.5), checkpoint=checkpoint, checkpoint_key="a")
    fresh = run(digits_standardized, SMALL, checkpoint=checkpoint, checkpoint_key="b")
    assert fresh.images.tobytes() == run(digits_standardized, SMALL).images.tobytes()


def test_divergence_stops_with_step_and_keeps_checkpoint(digits_standardized, tmp_path):
    checkpoint = tmp_path / "kip.ckpt.npz"
    exploding = dataclasses.replace(SMALL, learning_rate=1e30, steps=50, checkpoint_every=1)
    with pytest.raises(kip.DivergenceError, match=r"at step \d+.*learning_rate") as info:
        run(digits_standardized, exploding, checkpoint=checkpoint, checkpoint_key="k")
    assert "\n" not in str(info.value)
    assert checkpoint.exists()
    with np.load(checkpoint) as saved:
        assert all(np.isfinite(saved[k]).all() for k in saved.files if k != "meta")


def test_labels_move_only_when_learned(digits_standardized):
    fixed = run(digits_standardized, SMALL)
    learned = run(digits_standardized, dataclasses.replace(SMALL, learn_labels=True))
    one_hot = krr.centered_one_hot(fixed.classes, 10)
    np.testing.assert_array_equal(fixed.labels, one_hot)
    assert np.abs(learned.labels - one_hot).max() > 1e-3


def test_initialisation_is_class_balanced_real_or_noise(digits_standardized):
    x_train, y_train, _, _ = digits_standardized
    images, classes = kip.init_support(x_train, y_train, 10, SMALL)
    assert np.bincount(classes, minlength=10).tolist() == [2] * 10
    assert all(any(np.array_equal(img, x) for x in x_train[y_train == c]) for img, c in zip(images, classes))
    noise, _ = kip.init_support(x_train, y_train, 10, dataclasses.replace(SMALL, init="noise"))
    assert not any(np.array_equal(noise[0], x) for x in x_train)


def test_target_batches_are_class_balanced_and_reproducible():
    labels = np.repeat(np.arange(4), [50, 60, 70, 80])
    batch = kip.target_indices(labels, 4, 40, seed=3, step=7)
    assert np.bincount(labels[batch], minlength=4).tolist() == [10, 10, 10, 10]
    np.testing.assert_array_equal(batch, kip.target_indices(labels, 4, 40, seed=3, step=7))
    assert not np.array_equal(batch, kip.target_indices(labels, 4, 40, seed=3, step=8))
    assert len(kip.target_indices(labels, 4, 10_000, seed=0, step=0)) == len(labels)


def test_kip_beats_random_real_images_on_digits(digits_standardized):
    """20 learned digits vs 20 random real digits, KRR on the held-out split."""
    x_train, y_train, x_test, y_test = digits_standardized
    kernel_fn = kernels.make(KernelConfig())
    config = DistillConfig(support_per_class=2, steps=150, learning_rate=0.04, target_batch=1000, learn_labels=True)
    result = kip.distill(x_train, y_train, 10, kernel_fn, config, progress=False)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    learned = evaluate.krr_scores(kernel_fn, result.images, result.labels, x_test, y_test, 10, 1e-6)
    baseline = evaluate.random_subset_baseline(kernel_fn, x_train, y_train, x_test, y_test, 10, 2, 1e-6, 3, 0)
    assert learned["accuracy"] > baseline["accuracy"] + 0.05


def test_float64_option_computes_in_double(digits_standardized):
    config = dataclasses.replace(SMALL, steps=3, float64=True)
    result = run(digits_standardized, config)
    assert np.isfinite(result.images).all()
    single = run(digits_standardized, dataclasses.replace(config, float64=False))
    assert not np.array_equal(result.images, single.images)  # different arithmetic, same algorithm
    np.testing.assert_allclose(result.images, single.images, atol=1e-3)


def test_label_solve_fits_the_training_set_better_than_one_hot_labels(digits_standardized):
    x_train, y_train, x_test, y_test = digits_standardized
    kernel_fn = kernels.make(KernelConfig())
    config = DistillConfig(method="label_solve", support_per_class=3)
    solved = kip.label_solve(x_train, y_train, 10, kernel_fn, config)
    one_hot = krr.centered_one_hot(solved.classes, 10)
    assert solved.images.shape == (30, 8, 8, 1) and solved.labels.shape == (30, 10)
    scores_solved = evaluate.krr_scores(kernel_fn, solved.images, solved.labels, x_train, y_train, 10, 1e-6)
    scores_one_hot = evaluate.krr_scores(kernel_fn, solved.images, one_hot, x_train, y_train, 10, 1e-6)
    assert scores_solved["mse"] < scores_one_hot["mse"]
    assert scores_solved["accuracy"] > scores_one_hot["accuracy"]
