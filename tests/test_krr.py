"""KRR and Label Solve against scikit-learn and NumPy's least squares."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.kernel_ridge import KernelRidge

from pipeline.distill import krr


@pytest.fixture(autouse=True)
def float64():
    """Compare in double precision: the references are float64, and near-singular systems are the point."""
    from pipeline.compat import enable_x64

    with enable_x64():
        yield


def random_psd(rng, n, rank=None):
    a = rng.standard_normal((n, rank or n))
    return a @ a.T


@pytest.mark.parametrize("reg", [1e-6, 1e-2, 1.0])
def test_fit_predict_matches_sklearn_kernel_ridge(rng, reg):
    """Reference: scikit-learn's KernelRidge(kernel="precomputed", alpha = reg tr(K_ss)/n).
    Tolerance: both are float64 solves of K_ss + ridge I (K_ss has rank 13, so cond = 5.9e6,
    5.9e2 and 6.9 at the three regs); they differ by about n cond eps relative to the largest
    prediction: 5.2e-8 (8.8e-8 absolute) at reg 1e-6, measured 3.3e-8 relative (8.4e-10
    absolute); 1e-13 and 1e-15 at the others. atol 1e-6 plus rtol 1e-6 is >= 11x the former; a
    ridge without the tr/n scale (12.8x off) moves the largest prediction by 5e-3 (reg 1e-2) and
    0.3 (reg 1) relative."""
    features = rng.standard_normal((40, 12))
    test = rng.standard_normal((15, 12))
    k_ss = features @ features.T + 0.5
    k_ts = test @ features.T + 0.5
    y = rng.standard_normal((40, 3))
    ridge = reg * np.trace(k_ss) / len(k_ss)
    reference = KernelRidge(alpha=ridge, kernel="precomputed").fit(k_ss, y).predict(k_ts)
    ours = np.asarray(krr.predict(k_ts, krr.fit(k_ss, y, reg)))
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_label_solve_matches_lstsq(rng):
    """With a tiny ridge, y_s* = (K_ss + ridge I) z*, z* = lstsq(K_ts, y_t).
    Reference: NumPy's SVD least squares for z*, float64. Tolerance: ours keeps the normal
    equations' ridge' = reg tr(G)/n (G = K_st K_ts), which moves z by <= ridge'/lambda_min(G) =
    6.5e-10 relative (measured 4.6e-10); float64 rounding, n cond(G) eps = 2.5e-14, is negligible.
    rtol = atol = 1e-8 is >= 10x that bound (1.2e-9 absolute on the largest label, 1.8)."""
    n_s, n_t = 8, 60
    features = rng.standard_normal((n_s + n_t, 20))
    k = features @ features.T
    k_ss, k_ts = k[:n_s, :n_s], k[n_s:, :n_s]
    y_t = rng.standard_normal((n_t, 4))
    reg = 1e-10
    z, *_ = np.linalg.lstsq(k_ts, y_t, rcond=None)
    expected = (k_ss + reg * np.trace(k_ss) / n_s * np.eye(n_s)) @ z
    ours = np.asarray(krr.label_solve(k_ss, k_ts, y_t, reg))
    np.testing.assert_allclose(ours, expected, rtol=1e-8, atol=1e-8)


def _label_solve_problem(rng):
    """A support of 8 and 60 targets whose kernels have the scale of a real one (an offset of 1)."""
    features = rng.standard_normal((68, 20))
    k = features @ features.T / 20 + 1.0
    return k[:8, :8], k[8:, :8], rng.standard_normal((60, 4))


@pytest.mark.parametrize("reg", [0.1, 1.0])
def test_label_solve_matches_sklearn_ridge_where_the_ridge_matters(rng, reg):
    """Reference: scikit-learn's Ridge(alpha = reg tr(G)/n, no intercept) fitted on K_ts -> y_t,
    G = K_st K_ts, gives z*; then y_s* = (K_ss + reg tr(K_ss)/n I) z* in NumPy float64. At reg 0.1
    and 1 the two ridges change the labels at order 1 (tr(G)/n and tr(K_ss)/n differ 30-fold
    here, so one in place of the other fails). Both sides are float64 solves of systems whose
    condition number the ridge caps at 1 + n/reg <= 81 (71 and 20 measured). The largest
    difference: G's entries, summed over 60 targets in another order by each side, 60 eps =
    1.3e-14 relative (no cancellation: K_ts > 0), times cond <= 71: ~1e-12 relative to the largest
    label. 1e-11 leaves 10x (measured 1.6e-15)."""
    from sklearn.linear_model import Ridge

    k_ss, k_ts, y_t = _label_solve_problem(rng)
    n = len(k_ss)
    gram = k_ts.T @ k_ts
    z = Ridge(alpha=reg * np.trace(gram) / n, fit_intercept=False).fit(k_ts, y_t).coef_.T
    expected = (k_ss + reg * np.trace(k_ss) / n * np.eye(n)) @ z
    ours = np.asarray(krr.label_solve(k_ss, k_ts, y_t, reg))
    np.testing.assert_allclose(ours, expected, rtol=1e-11, atol=1e-11 * np.abs(expected).max())
    unregularised, *_ = np.linalg.lstsq(k_ts, y_t, rcond=None)
    assert np.abs(z - unregularised).max() > 0.1 * np.abs(unregularised).max()  # the ridge does matter here


@pytest.mark.parametrize("reg", [0.1, 1.0])
def test_label_solve_labels_zero_the_gradient_of_the_regularised_loss(rng, reg):
    """Optimality, by the definition rather than a solver: with z = (K_ss + ridge I)^-1 y_s the
    labels minimise f(z) = |K_ts z - y_t|^2 + ridge' |z|^2, ridge' = reg tr(G)/n, so
    K_st (K_ts z - y_t) + ridge' z = 0 at the solved labels (NumPy float64). Each term is of size
    S = |G| |z| + |K_st y_t|; recovering z and solving for it each lose at most cond * eps relative
    (cond <= 1 + n/reg <= 81 for both systems), so the gradient is below 100 * 81 * eps * S;
    the wrong ridge leaves a gradient of order ridge' |z|, ~1e-2 S or more."""
    k_ss, k_ts, y_t = _label_solve_problem(rng)
    n = len(k_ss)
    gram = k_ts.T @ k_ts
    solved = np.asarray(krr.label_solve(k_ss, k_ts, y_t, reg))
    z = np.linalg.solve(k_ss + reg * np.trace(k_ss) / n * np.eye(n), solved)
    gradient = k_ts.T @ (k_ts @ z - y_t) + reg * np.trace(gram) / n * z
    scale = np.abs(gram).max() * np.abs(z).max() + np.abs(k_ts.T @ y_t).max()
    assert np.abs(gradient).max() <= 100 * (1 + n / reg) * np.finfo(np.float64).eps * scale


@pytest.mark.parametrize("reg", [1e-4, 0.1])
def test_krr_scores_match_sklearn_kernel_ridge_end_to_end(rng, reg):
    """evaluate.krr_scores (support kernel, float64 solve, blocked K_ts, scores) against
    scikit-learn's KernelRidge(kernel="precomputed", alpha=reg tr(K_ss)/n) fitted on the same
    kernel matrices, with accuracy and MSE computed here from its predictions in NumPy. The kernel
    is tested elsewhere; only the solve and the scoring are under test; the targets are the float32
    centred one-hot krr_scores scores against. Error analysis: both solves are float64, so the
    predictions differ by at most n cond eps |K_ts| |alpha| (cond of K_ss + ridge, a few hundred
    here), and the MSE, relatively, by twice that over |residual|; 10x that is the tolerance (~1e-9).
    Projecting in float32 (errors ~1e-6) or an unscaled ridge cannot pass. The arg-max (accuracy)
    is exact unless two classes tie to that level: the smallest top-two gap is checked."""
    from pipeline.evaluate.scoring import krr_scores
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import KernelConfig

    kernel_fn = kernels.make(KernelConfig())
    support = rng.standard_normal((30, 4, 4, 1)).astype(np.float32)
    support_labels = krr.centered_one_hot(np.arange(30) % 3, 3) + 0.1 * rng.standard_normal((30, 3))
    test_images = rng.standard_normal((50, 4, 4, 1)).astype(np.float32)
    test_labels = rng.integers(0, 3, 50)
    k_ss = np.asarray(kernels.support_matrix(kernel_fn, support), np.float64)
    # in the 16-row tiles krr_scores computes below: both sides see the same float32 kernel entries
    k_ts = np.asarray(kernels.kernel_matrix(kernel_fn, test_images, support, block_size=16), np.float64)
    n = len(k_ss)
    ridge = reg * np.trace(k_ss) / n
    model = KernelRidge(alpha=ridge, kernel="precomputed").fit(k_ss, support_labels)
    predictions = model.predict(k_ts)
    one_hot = (np.eye(3, dtype=np.float32)[test_labels] - np.float32(1 / 3)).astype(np.float64)
    residual = predictions - one_hot
    amplification = np.linalg.norm(k_ts, 2) * np.linalg.norm(model.dual_coef_) / np.linalg.norm(residual)
    tol = 10 * 2 * n * np.linalg.cond(k_ss + ridge * np.eye(n)) * np.finfo(np.float64).eps * amplification
    assert tol < 1e-7
    top_two = np.sort(predictions, axis=1)[:, -2:]
    assert np.min(top_two[:, 1] - top_two[:, 0]) > 1e-6
    got = krr_scores(kernel_fn, support, support_labels, test_images, test_labels, 3, reg, block_size=16)
    assert got["accuracy"] == np.mean(np.argmax(predictions, axis=1) == test_labels)
    assert got["mse"] == pytest.approx(np.mean(np.sum(residual ** 2, axis=1)), rel=tol, abs=0)


def test_accuracy_and_mse_by_hand():
    """Reference: the values worked out by hand. A dozen float64 operations round by ~1e-16
    relative, so rel 1e-12 has room to spare; a mean over the wrong axis or a missing square is
    off by O(1)."""
    predictions = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    assert krr.accuracy(predictions, labels) == pytest.approx(2 / 3, rel=1e-12)
    targets = krr.centered_one_hot(labels, 2)
    np.testing.assert_allclose(targets, [[0.5, -0.5], [-0.5, 0.5], [-0.5, 0.5]])
    expected = np.mean([(0.4**2 + 0.6**2), (0.7**2 + 0.3**2), (1.1**2 + 0.1**2)])
    assert krr.mse(predictions, targets) == pytest.approx(expected, rel=1e-12)


def test_a_singular_support_kernel_names_the_regulariser_to_raise(rng):
    from pipeline.errors import UserError
    from pipeline.evaluate.scoring import krr_scores

    image = rng.standard_normal((1, 4, 4, 1)).astype(np.float32)
    support = np.concatenate([image, image])
    labels = np.array([[1.0, -1.0], [-1.0, 1.0]])

    def blind(a, b):  # sees no difference between images: K_ss is all ones, singular in any precision
        return jnp.ones((a.shape[0], b.shape[0]), jnp.float32)

    # (Not the NTK of two copies of one image: its off-diagonal entry may differ from the diagonal by
    # float32 rounding, by how the XLA build orders the sums, and the system is then solvable.)
    with pytest.raises(UserError, match=r"singular or too ill-conditioned to solve with evaluate.reg=0.0; raise evaluate.reg"):
        krr_scores(blind, support, labels, image, np.array([0]), 2, reg=0.0)


def test_a_finite_solution_that_solves_nothing_is_caught():
    """Cholesky of an exactly singular K_ss can end on a rounding-sized pivot instead of zero: alpha
    comes out finite (~1e15) and K alpha is nowhere near y. The residual check refuses it and
    accepts a true solution of an ill-conditioned but solvable system."""
    from pipeline.evaluate.scoring import _solves

    labels = np.array([[1.0, -1.0], [-1.0, 1.0]])
    singular = np.ones((2, 2))
    assert not _solves(singular, labels, 0.0, np.array([[4.5e15, -4.5e15], [-4.5e15, 4.5e15]]))
    solvable = np.array([[1.0, 1.0 - 1e-8], [1.0 - 1e-8, 1.0]])  # condition number ~2e8
    assert _solves(solvable, labels, 0.0, np.linalg.solve(solvable, labels))


def test_the_random_baseline_is_krr_on_class_balanced_real_images_as_given(rng):
    """The baseline scores the training images it is handed, untouched, in the test images' space:
    the mean of KRR on each repeat's class-balanced subset (rng [seed, 2, repeat]). Consistency
    check, not a reference: it recomputes with our own krr_scores (held to scikit-learn above) to
    check the subsets and the averaging; the same computations agree to the mean's rounding, and a
    wrong subset moves an accuracy by a multiple of 1/25."""
    from pipeline.distill.kip import class_balanced_indices
    from pipeline.evaluate.scoring import krr_scores, random_subset_baseline
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import KernelConfig

    x_train = rng.standard_normal((60, 3, 3, 1)).astype(np.float32)
    y_train = np.arange(60) % 3
    x_test = rng.standard_normal((25, 3, 3, 1)).astype(np.float32)
    y_test = np.arange(25) % 3
    kernel_fn = kernels.make(KernelConfig())
    got = random_subset_baseline(kernel_fn, x_train, y_train, x_test, y_test, 3, 4, 1e-6, repeats=3, seed=7)
    accuracies = []
    for repeat in range(3):
        idx = class_balanced_indices(y_train, 4, 3, np.random.default_rng([7, 2, repeat]))
        assert np.array_equal(np.bincount(y_train[idx], minlength=3), [4, 4, 4])
        scores = krr_scores(kernel_fn, x_train[idx], krr.centered_one_hot(y_train[idx], 3), x_test, y_test, 3, 1e-6)
        accuracies.append(scores["accuracy"])
    assert got["accuracy"] == pytest.approx(np.mean(accuracies))
    assert got["accuracy_std"] == pytest.approx(np.std(accuracies))


def test_fit_gradients_match_central_differences(rng):
    """krr.fit's hand-written gradient against float64 central differences: in K_ss along symmetric
    directions (the Cholesky reads one triangle, so only the symmetric part is defined, and that is
    what fit returns) and in the labels. The loss is smooth, so the difference error is
    O(h^2 f''' / f') + O(eps |f| / (h f')): each derivative in K brings a factor |E| /
    lambda_min(K_ss + ridge) ~ 10/12, so the first is ~1e-11 at h = 1e-5; the loss itself rounds
    by ~n cond eps (cond ~ 5), which over 2h is 7e-10 x |f/f'| (~0.02) x its cancellation. Measured:
    <= 1.1e-10 in K, <= 1.6e-11 in the labels (the loss is quadratic in them: rounding only).
    rel 3e-9 is >= 20x that, while a wrong sign or factor (errors of order 1) cannot pass."""
    import jax
    import jax.numpy as jnp

    k_ss = jnp.asarray(random_psd(rng, 12) + 12 * np.eye(12))
    y_s = jnp.asarray(rng.standard_normal((12, 3)))
    weights = jnp.asarray(rng.standard_normal((12, 3)))
    loss = lambda k, y: jnp.sum(weights * krr.fit(k, y, 1e-2) ** 2)  # noqa: E731
    grad_k, grad_y = jax.grad(loss, argnums=(0, 1))(k_ss, y_s)
    np.testing.assert_allclose(grad_k, grad_k.T, rtol=0, atol=1e-15 * float(jnp.max(jnp.abs(grad_k))))
    h = 1e-5
    for _ in range(3):
        e = rng.standard_normal((12, 12))
        e = jnp.asarray(e + e.T)
        numeric = (loss(k_ss + h * e, y_s) - loss(k_ss - h * e, y_s)) / (2 * h)
        assert float(jnp.sum(grad_k * e)) == pytest.approx(float(numeric), rel=3e-9)
        d = jnp.asarray(rng.standard_normal((12, 3)))
        numeric = (loss(k_ss, y_s + h * d) - loss(k_ss, y_s - h * d)) / (2 * h)
        assert float(jnp.sum(grad_y * d)) == pytest.approx(float(numeric), rel=3e-9)
    # one label vector (1-D y) takes the same path: its gradient is the first column's
    one = lambda k, y: jnp.sum(weights[:, 0] * krr.fit(k, y, 1e-2) ** 2)  # noqa: E731
    grad_k1, grad_y1 = jax.grad(one, argnums=(0, 1))(k_ss, y_s[:, 0])
    first = lambda k, y: jnp.sum(weights[:, :1] * krr.fit(k, y, 1e-2) ** 2)  # noqa: E731
    grad_k2, grad_y2 = jax.grad(first, argnums=(0, 1))(k_ss, y_s[:, :1])
    np.testing.assert_allclose(grad_k1, grad_k2, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grad_y1, grad_y2[:, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("reg", [1e-2, 0.5])
def test_fit_gradients_through_the_ridge_match_autodiff_of_the_plain_formula(rng, reg):
    """The ridge reg * tr(K)/n moves with K and with reg; `krr._regularised` writes that gradient
    by hand (dK = G + (reg/n) tr(G) I, d reg = tr(G) tr(K)/n). The reference is autodiff of the
    plain formula through jnp.trace and jnp.linalg.solve, in float64 (symmetrised in K, the only
    part fit defines). Both are float64 solves (Cholesky against LU) of a system with condition
    number 4.8 and 2.8: each solve is good to n cond eps = 1.1e-14 relative, and the gradients
    combine two solves and a trace, ~2.5e-14; 3e-13 leaves 10x (measured <= 1.8e-15), while a
    missing or doubled ridge term moves the gradient by 5e-4 of its largest entry or more here."""
    import jax
    import jax.numpy as jnp

    n = 10
    k_ss = jnp.asarray(random_psd(rng, n) + n * np.eye(n))
    y_s = jnp.asarray(rng.standard_normal((n, 3)))
    weights = jnp.asarray(rng.standard_normal((n, 3)))

    def ours(k, r):
        return jnp.sum(weights * krr.fit(k, y_s, r) ** 2)

    def plain(k, r):
        k_reg = k + r * jnp.trace(k) / n * jnp.eye(n)
        return jnp.sum(weights * jnp.linalg.solve(k_reg, y_s) ** 2)

    reg = jnp.asarray(reg, jnp.float64)
    grad_k, grad_reg = jax.grad(ours, argnums=(0, 1))(k_ss, reg)
    want_k, want_reg = jax.grad(plain, argnums=(0, 1))(k_ss, reg)
    want_k = 0.5 * (want_k + want_k.T)
    scale = float(jnp.max(jnp.abs(want_k)))
    np.testing.assert_allclose(grad_k, want_k, rtol=0, atol=3e-13 * scale)
    assert float(grad_reg) == pytest.approx(float(want_reg), rel=3e-13)
    assert float(krr.ridge(k_ss, float(reg))) == pytest.approx(float(reg) * float(np.trace(np.asarray(k_ss))) / n, rel=1e-14)


def test_fit_gradients_keep_float32_under_jit_with_a_python_float_reg(rng):
    """How KIP calls it: float32 K and labels, reg a Python float, under jit. The hand-written
    gradients must come back in float32 (no silent promotion) and agree with the float64 ones to
    float32 accuracy (the system's condition number is below 10: 1e-4 relative is ~1000 ulps).
    Reference: the same function in float64. Each float32 solve is good to n cond u = 8 x 4.1 x
    6e-8 = 2e-6 relative, the gradient combines two: ~4e-6, so 1e-4 is 25x (measured 4.2e-7)."""
    import jax
    import jax.numpy as jnp

    n = 8
    k64 = random_psd(rng, n) + n * np.eye(n)
    y64 = rng.standard_normal((n, 2))
    loss = lambda k, y: jnp.sum(krr.fit(k, y, 0.1) ** 2)  # noqa: E731
    grad_k, grad_y = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(k64, jnp.float32), jnp.asarray(y64, jnp.float32))
    assert grad_k.dtype == jnp.float32 and grad_y.dtype == jnp.float32
    want_k, want_y = jax.grad(loss, argnums=(0, 1))(jnp.asarray(k64), jnp.asarray(y64))
    np.testing.assert_allclose(grad_k, want_k, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want_k))))
    np.testing.assert_allclose(grad_y, want_y, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want_y))))


def test_a_whole_block_of_rows_scored_alone_gives_the_bytes_of_a_full_scoring(rng):
    """What tests/test_published_supports.py relies on when it re-scores one block of the test split
    against predictions a full scoring recorded: evaluate.krr_predictions (kernel by 16-row tiles
    here) and conv_features.krr_predictions (features and products by 8-row blocks) give an aligned
    block's rows the same bytes whether scored with the other rows or alone. Consistency check
    between two calls of our own code: equal, not close."""
    from pipeline.evaluate.scoring import krr_predictions
    from pipeline.kernels import conv_features, functions as kernels
    from pipeline.kernels.conv_features import ConvFeatureConfig
    from pipeline.run.config import KernelConfig

    support = rng.standard_normal((12, 8, 8, 1)).astype(np.float32)
    labels = krr.centered_one_hot(np.arange(12) % 3, 3)
    test_images = rng.standard_normal((48, 8, 8, 1)).astype(np.float32)
    block = slice(16, 32)
    kernel_fn = kernels.make(KernelConfig())
    full = krr_predictions(kernel_fn, support, labels, test_images, 1e-4, block_size=16)
    alone = krr_predictions(kernel_fn, support, labels, test_images[block], 1e-4, block_size=16)
    assert full.shape == (48, 3) and np.array_equal(full[block], alone)
    config = ConvFeatureConfig(width=8, depth=2, networks=2)
    params = conv_features.init(conv_features.network_key(0, conv_features.EVAL_STREAM, 0), config, (8, 8, 1))
    full = conv_features.krr_predictions(support, labels, test_images, params, config, 1e-4, block_size=8)
    alone = conv_features.krr_predictions(support, labels, test_images[block], params, config, 1e-4, block_size=8)
    assert full.shape == (48, 3) and np.array_equal(full[block], alone)
