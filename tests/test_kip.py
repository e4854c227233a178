"""The KIP loop: its gradient, its determinism, resume, divergence, and that it learns."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline.compat import enable_x64

from pipeline.distill import kip, krr
from pipeline.evaluate import scoring as evaluate
from pipeline.kernels import functions as kernels
from pipeline.run.config import DistillConfig, KernelConfig

SMALL = DistillConfig(support_per_class=2, steps=30, learning_rate=0.02, target_batch=300, checkpoint_every=10)


@pytest.mark.parametrize("spec", [KernelConfig(), KernelConfig(kind="nngp", depth=2), KernelConfig(architecture="rbf")],
                         ids=["fc-ntk", "fc-nngp-2", "rbf"])
@pytest.mark.parametrize("wrt", ["images", "labels"])
def test_gradient_matches_central_differences(rng, spec, wrt):
    """Reference: float64 central differences of the loss, step h = 1e-4. Their error is
    h^2 f'''/6 + ~eps |f| / h: the first dominates in the images (doubling h quadruples it) and is
    <= 5e-11 absolute, <= 1.6e-8 relative for gradients above 1e-4; the loss is quadratic in the
    labels, so there only rounding is left (eps |f| / h ~ 1.4e-12; measured <= 1.1e-12). abs 1e-9
    is 20x the largest absolute error and rel 3e-7 ~20x the largest relative one."""
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
            assert grad[index] == pytest.approx(numeric, rel=3e-7, abs=1e-9)


def run(data, config, **kwargs):
    x_train, y_train, _, _ = data
    return kip.distill(x_train, y_train, 10, kernels.make(KernelConfig()), config, progress=False, **kwargs)


@pytest.fixture(scope="module")
def small_run(digits_standardized):
    """run(SMALL), computed once: the determinism, resume, other-params, labels and float64 tests
    all compare against this one run (each run of it costs a compilation and 30 steps)."""
    return run(digits_standardized, SMALL)


def test_same_seed_same_support_bit_for_bit(digits_standardized, small_run):
    first = small_run
    second = run(digits_standardized, SMALL)
    assert first.images.tobytes() == second.images.tobytes()
    assert first.labels.tobytes() == second.labels.tobytes()
    other = run(digits_standardized, dataclasses.replace(SMALL, seed=1))
    assert other.images.tobytes() != first.images.tobytes()


def test_resume_from_checkpoint_is_bit_identical(digits_standardized, small_run, tmp_path):
    checkpoint = tmp_path / "kip.ckpt.npz"
    reference = small_run
    run(digits_standardized, dataclasses.replace(SMALL, steps=20), checkpoint=checkpoint, checkpoint_key="k")
    resumed = run(digits_standardized, SMALL, checkpoint=checkpoint, checkpoint_key="k")
    assert resumed.images.tobytes() == reference.images.tobytes()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]


def test_checkpoint_of_other_params_is_ignored(digits_standardized, small_run, tmp_path):
    checkpoint = tmp_path / "kip.ckpt.npz"
    run(digits_standardized, dataclasses.replace(SMALL, steps=20, learning_rate=0.5), checkpoint=checkpoint, checkpoint_key="a")
    fresh = run(digits_standardized, SMALL, checkpoint=checkpoint, checkpoint_key="b")
    assert fresh.images.tobytes() == small_run.images.tobytes()


def test_divergence_stops_with_step_and_keeps_checkpoint(digits_standardized, tmp_path):
    checkpoint = tmp_path / "kip.ckpt.npz"
    exploding = dataclasses.replace(SMALL, learning_rate=1e30, steps=50, checkpoint_every=1)
    with pytest.raises(kip.DivergenceError, match=r"at step \d+.*learning_rate") as info:
        run(digits_standardized, exploding, checkpoint=checkpoint, checkpoint_key="k")
    assert "\n" not in str(info.value)
    assert checkpoint.exists()
    with np.load(checkpoint) as saved:
        assert all(np.isfinite(saved[k]).all() for k in saved.files if k != "meta")


def test_labels_move_only_when_learned(digits_standardized, small_run):
    fixed = small_run
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


def test_float64_option_computes_in_double(digits_standardized, small_run, tmp_path):
    """float64=True keeps the support and Adam's moments in float64 (the checkpoint's leaves), and
    its step-1 loss equals a NumPy float64 recomputation on the same initial support and first
    target batch (kip.init_support, kip.target_indices(seed, step 0); targets are the float32
    centred one-hot the loop casts up). The kernel matrices come from the kernel function in
    float64 (tested elsewhere); the solve and the loss formula are NumPy's. Error analysis: the
    two float64 solves differ by up to n cond eps in alpha, and the loss, relatively, by twice that
    times |K_ts| |alpha| / |residual| (cancellation in the residual); 10x that is the tolerance.
    The float32 run (`small_run`: same support, same first batch) must miss it."""
    x_train, y_train, _, _ = digits_standardized
    config = dataclasses.replace(SMALL, steps=3, float64=True, checkpoint_every=3)
    checkpoint = tmp_path / "kip.ckpt.npz"
    result = run(digits_standardized, config, checkpoint=checkpoint, checkpoint_key="k")
    _, leaves = kip.read_checkpoint(checkpoint)
    floats = [leaf.dtype for leaf in leaves if not np.issubdtype(leaf.dtype, np.integer)]
    assert floats == [np.dtype(np.float64)] * 6  # images, labels, and Adam's mu and nu of each

    images, classes = kip.init_support(x_train, y_train, 10, config)
    idx = kip.target_indices(y_train, 10, config.target_batch, config.seed, 0)
    with enable_x64():
        kernel_fn = kernels.make(KernelConfig())
        x_s, x_t = jnp.asarray(images, jnp.float64), jnp.asarray(x_train[idx], jnp.float64)
        k_ss, k_ts = np.asarray(kernels.self_kernel(kernel_fn, x_s)), np.asarray(kernel_fn(x_t, x_s))
    one_hot = lambda labels: (np.eye(10, dtype=np.float32)[labels] - np.float32(0.1)).astype(np.float64)  # noqa: E731
    y_s, y_t = one_hot(classes), one_hot(y_train[idx])
    n = len(k_ss)
    k_reg = k_ss + config.reg * np.trace(k_ss) / n * np.eye(n)
    alpha = np.linalg.solve(k_reg, y_s)
    residual = k_ts @ alpha - y_t
    expected = 0.5 * np.mean(residual ** 2)
    amplification = np.linalg.norm(k_ts, 2) * np.linalg.norm(alpha) / np.linalg.norm(residual)
    tol = 10 * 2 * n * np.linalg.cond(k_reg) * np.finfo(np.float64).eps * amplification
    assert tol < 1e-7  # float32 arithmetic would be off by more
    assert result.history[0]["loss"] == pytest.approx(expected, rel=tol, abs=0)
    assert small_run.history[0]["loss"] != pytest.approx(expected, rel=tol, abs=0)


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


def _kernel_rows_and_scans(closed_jaxpr, n_s: int, d: int) -> tuple[list[int], int]:
    """Rows of every 2-D intermediate with n_s columns (a K_ts block, its Gram matrix and their
    element-wise maps), leaving out K_ss (n_s rows) and the flattened support's transpose (d rows);
    and the number of scans. Walks every sub-program: scan and checkpoint bodies, custom rules, pjit."""
    rows, scans = [], 0

    def visit(jaxpr):
        nonlocal scans
        for eqn in jaxpr.eqns:
            scans += eqn.primitive.name == "scan"
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if len(shape) == 2 and shape[1] == n_s and shape[0] not in (n_s, d):
                    rows.append(shape[0])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(closed_jaxpr.jaxpr)
    return rows, scans


def test_kernel_block_bounds_the_rows_of_every_kernel_block(rng):
    """`kernel_block` is a memory budget in kernel entries (kip_loss's docstring): each K_ts block
    holds max(1, kernel_block // n_s) target rows, the most that fit and at least one, and a batch
    that fits is computed in one piece, without a scan. Read off the traced program
    (jax.make_jaxpr): the largest (rows, n_s) intermediate and the number of scans, at budgets
    below one row, of one row, of 7 rows with a remainder, of just under and exactly the batch,
    and none. At each budget the loss must equal the float64 NumPy formula
    0.5 mean((K_ts (K_ss + reg tr(K_ss)/n I)^-1 y_s - y_t)^2), the mean over targets and classes,
    on kernel matrices from the kernel function (tested against closed forms elsewhere): both are
    float64 solves of a system with condition number 5.1 (the ridge 1e-3 tr/n caps it at 6e3), and
    the blocks' kernel entries may round differently (d eps = 7e-15): the loss agrees to
    ~2 (n + d) cond eps |K_ts| |alpha| / |residual| = 1.4e-13 (that ratio is 1.6); rel 3e-12
    leaves 20x (measured <= 1.7e-16)."""
    n_s, n_t, d = 6, 50, 32
    kernel_fn = kernels.make(KernelConfig())
    with enable_x64():
        x_s, x_t = rng.standard_normal((n_s, 4, 4, 2)), rng.standard_normal((n_t, 4, 4, 2))
        y_s, y_t = rng.standard_normal((n_s, 3)), rng.standard_normal((n_t, 3))
        support = kip.Support(jnp.asarray(x_s), jnp.asarray(y_s))
        k_ss = np.asarray(kernels.self_kernel(kernel_fn, jnp.asarray(x_s)))
        k_ts = np.asarray(kernel_fn(jnp.asarray(x_t), jnp.asarray(x_s)))
        k_reg = k_ss + 1e-3 * np.trace(k_ss) / n_s * np.eye(n_s)
        expected = 0.5 * np.mean((k_ts @ np.linalg.solve(k_reg, y_s) - y_t) ** 2)
        budgets = [(n_s - 1, 1), (n_s + 1, 1), (7 * n_s + 5, 7), (n_t * n_s - 1, 25), (n_t * n_s, n_t), (None, n_t)]
        for block, most_rows in budgets:
            loss = lambda s: kip.kip_loss(kernel_fn, 1e-3, s, jnp.asarray(x_t), jnp.asarray(y_t), kernel_block=block)  # noqa: E731
            rows, scans = _kernel_rows_and_scans(jax.make_jaxpr(loss)(support), n_s, d)
            assert max(rows) == most_rows, (block, sorted(set(rows)))
            assert (scans > 0) == (most_rows < n_t), (block, scans)
            assert float(loss(support)) == pytest.approx(expected, rel=3e-12)
