"""The fast path against neural-tangents: our closed-form FC kernels and our KIP step must equal
the plain neural-tangents kernel_fn + solve (the paper's code) to 1e-5 relative."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
import optax
import pytest
from pipeline.compat import enable_x64

from pipeline.distill import kip
from pipeline.kernels import closed_form, functions as kernels
from pipeline.run.config import DistillConfig, KernelConfig

GRID = [
    KernelConfig(architecture="fc", kind=kind, depth=depth, parameterization=param, activation=act, b_std=b_std)
    for kind, depth, param, act, b_std in itertools.product(
        ["ntk", "nngp"], [1, 3], ["ntk", "standard"], ["relu", "erf"], [0.0, 0.5])
]


def _ids(spec: KernelConfig) -> str:
    return f"{spec.kind}-d{spec.depth}-{spec.parameterization}-{spec.activation}-b{spec.b_std}"


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.exact
@pytest.mark.parametrize("spec", GRID, ids=_ids)
def test_kernel_and_its_gradient_equal_neural_tangents(rng, spec):
    """Reference: neural-tangents' stax kernel_fn (and autodiff through it), all in float64.
    Tolerances: K(x1, x2) starts from length-32 dot products (worst case 32 eps = 7e-15 relative)
    and each layer adds a few roundings, with arccos/arcsin conditioning <= 2 away from c = +-1:
    <= ~3e-14 at depth 3, so 3e-13 leaves 10x (measured <= 5e-16). K(x, x): see the comment
    below (measured <= 1.6e-8 against 1e-7). The gradient: the cross-kernel part agrees to 3e-15,
    but on K(x, x)'s diagonal neural-tangents' O(sqrt(eps)) angle sits where arccos' derivative
    is 1/sin(theta), so its gradient there is off by up to 3.8e-7 over this grid (measured);
    1e-5 is 26x that, while a wrong derivative is off by O(1)."""
    with enable_x64():
        x1 = jnp.asarray(rng.standard_normal((7, 4, 4, 2)))
        x2 = jnp.asarray(rng.standard_normal((5, 4, 4, 2)))
        ours, reference = kernels.make(spec), kernels.make_reference(spec)
        assert isinstance(ours, kernels.GramKernelFn) and not isinstance(reference, kernels.GramKernelFn)
        assert _relative(ours(x1, x2), reference(x1, x2)) < 3e-13
        # On K(x, x)'s diagonal the angle is 0; computed from rounded dot products it is O(sqrt(eps)),
        # 1e-8 in float64. Ours pins it to 0 exactly, neural-tangents does not: they differ at that level.
        assert _relative(kernels.self_kernel(ours, x1), reference(x1, x1)) < 1e-7

        def summary(kernel_fn, x):  # any smooth scalar of K_ss and K_ts exercises every entry's gradient
            return jnp.sum(jnp.sin(kernel_fn(x, x))) + jnp.sum(jnp.cos(kernel_fn(x2, x)))

        grad_ours = jax.grad(lambda x: summary(ours, x))(x1)
        grad_reference = jax.grad(lambda x: summary(reference, x))(x1)
        assert _relative(grad_ours, grad_reference) < 1e-5


def _reference_loss(spec, reg, x_s, y_s, x_t, y_t):
    """The KIP notebook's loss: neural-tangents kernel_fn and a positive-definite solve."""
    _, _, kernel_fn = kernels.stax_network(spec)
    k_ss = kernel_fn(x_s, x_s, spec.kind)
    k_ts = kernel_fn(x_t, x_s, spec.kind)
    k_reg = k_ss + reg * jnp.trace(k_ss) * jnp.eye(k_ss.shape[0]) / k_ss.shape[0]
    prediction = k_ts @ jsp.linalg.solve(k_reg, y_s, assume_a="pos")
    return 0.5 * jnp.mean((prediction - y_t) ** 2)


@pytest.mark.exact
@pytest.mark.parametrize("spec", [KernelConfig(), KernelConfig(kind="nngp", depth=2), KernelConfig(activation="erf")],
                         ids=["fc-ntk", "fc-nngp-2", "fc-erf"])
def test_kip_step_equals_the_papers_step(digits_standardized, spec):
    """Value and gradient (images and labels) of our KIP loss against the reference, on real
    digits (supports taken from the targets' own distribution, so K_ss is a realistic matrix).
    Tolerance, all float64: rounding through the solve is n cond eps ~ 2e-11 (cond(K_ss + ridge)
    = 5e2 to 2.4e3 here). The larger term is the reference's own: neural-tangents leaves an
    O(sqrt(eps)) ~ 2e-8 angle on K_ss's diagonal, which moves the NTK's slope term by ~theta/2pi
    ~ 3e-9 relative, and cond = 5e2 carries that to ~1.7e-6 in the loss and gradients; 1e-5 is 6x
    that (the NNGP and erf cases, with no such term, share it). Measured <= 1.2e-13."""
    x_train, y_train, _, _ = digits_standardized
    with enable_x64():
        x_s = jnp.asarray(x_train[:40], jnp.float64)
        y_s = jnp.asarray(np.eye(10)[y_train[:40]] - 0.1)
        x_t = jnp.asarray(x_train[100:600], jnp.float64)
        y_t = jnp.asarray(np.eye(10)[y_train[100:600]] - 0.1)
        reg = 1e-4
        ours = jax.value_and_grad(
            lambda xs, ys: kip.kip_loss(kernels.make(spec), reg, kip.Support(xs, ys), x_t, y_t), argnums=(0, 1))
        reference = jax.value_and_grad(lambda xs, ys: _reference_loss(spec, reg, xs, ys, x_t, y_t), argnums=(0, 1))
        (loss, (g_images, g_labels)), (loss_ref, (g_images_ref, g_labels_ref)) = ours(x_s, y_s), reference(x_s, y_s)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-5)
    assert _relative(g_images, g_images_ref) < 1e-5
    assert _relative(g_labels, g_labels_ref) < 1e-5


@pytest.mark.exact
def test_float32_kernel_is_close_to_float64_reference(digits_standardized):
    """The float32 fast path (polynomial arc-cosine, pinned diagonal) against neural-tangents in
    float64: what KIP actually runs, held to float32-level error. Error analysis: each float32 dot
    product of length d = 64 rounds by ~sqrt(d) u = 4.8e-7 relative (probabilistic bound,
    Higham & Mary 2019; u = 2^-24), so the cosine by ~1e-6; the NTK's slope term (pi - arccos c)/2pi
    amplifies that by 1/(2 pi sin theta) <= 1.5 at the closest pair of these digits (cos 0.9945):
    ~1.5e-6 of the kernel's scale, plus the polynomial's 2.2e-8. 1e-5 is ~7x that (measured:
    6.1e-7, diagonal 2.2e-7, cross 7.0e-7)."""
    x_train = digits_standardized[0]
    spec = KernelConfig()
    ours = np.asarray(kernels.self_kernel(kernels.make(spec), jnp.asarray(x_train[:200], jnp.float32)))
    cross = np.asarray(kernels.make(spec)(jnp.asarray(x_train[200:500], jnp.float32), jnp.asarray(x_train[:200], jnp.float32)))
    with enable_x64():
        reference = kernels.make_reference(spec)
        exact = np.asarray(reference(jnp.asarray(x_train[:200], jnp.float64), jnp.asarray(x_train[:200], jnp.float64)))
        exact_cross = np.asarray(reference(jnp.asarray(x_train[200:500], jnp.float64), jnp.asarray(x_train[:200], jnp.float64)))
    assert _relative(ours, exact) < 1e-5
    assert _relative(np.diag(ours), np.diag(exact)) < 1e-5
    assert _relative(cross, exact_cross) < 1e-5


@pytest.mark.parametrize("spec", GRID[::3] + [KernelConfig(architecture="rbf")], ids=lambda s: s.architecture + "-" + _ids(s))
def test_self_kernel_gradient_under_an_asymmetric_cotangent(rng, spec):
    """K_ss's backward pass symmetrises the cotangent and then does one Gram matmul instead of two.
    Under a cotangent that is not symmetric (a weight W != W^T), the gradient must still be the
    plain autodiff gradient of the unsymmetrised computation, to float64 rounding. Reference: JAX
    autodiff of the same forward pass (a check of the custom VJP, not of the kernel). The two differ
    only in contracting the Gram cotangent, (G + G^T)/2 * 2 a against G a + G^T a: reordered
    length-9 sums, ~9 eps = 2e-15 relative to sum |G a| (measured <= 1.8e-15); 1e-13 leaves 50x
    for cancellation in G a, while skipping the symmetrisation is off by >= 0.12."""
    with enable_x64():
        x = jnp.asarray(rng.standard_normal((9, 4, 4, 2)))
        weight = jnp.asarray(rng.standard_normal((9, 9)))
        ours = kernels.make(spec)

        def plain(x):  # the same kernel through autodiff's own two-matmul Gram backward pass
            gram, sq, _ = closed_form.flat_gram(x, x)
            return ours.from_gram(gram, sq, sq, 32, same=True)

        loss = lambda k: jnp.sum(weight * k) + jnp.sum(jnp.sin(k) * weight.T ** 2)
        np.testing.assert_array_equal(kernels.self_kernel(ours, x), plain(x))
        assert _relative(jax.grad(lambda x: loss(kernels.self_kernel(ours, x)))(x), jax.grad(lambda x: loss(plain(x)))(x)) < 1e-13


@pytest.mark.parametrize("spec", GRID[::3] + [KernelConfig(architecture="rbf")], ids=lambda s: s.architecture + "-" + _ids(s))
def test_self_kernel_of_symmetric_use_under_a_symmetric_cotangent(rng, spec):
    """symmetric_use=True skips symmetrising the cotangent: under one that is symmetric (a
    weight W = W^T, as krr.fit's gradient is) the gradient is autodiff's two-matmul one, to float64
    rounding, and an asymmetric weight shows the path really skips it (a different gradient).
    Reference: JAX autodiff of the same forward pass (a check of the custom VJP). Under a symmetric
    cotangent, 2 G a and G a + G^T a differ by reordered length-9 sums, ~9 eps = 2e-15 relative
    to sum |G a|: 1e-13 leaves 50x for cancellation (measured <= 1.8e-16)."""
    with enable_x64():
        x = jnp.asarray(rng.standard_normal((9, 4, 4, 2)))
        weight = jnp.asarray(rng.standard_normal((9, 9)))
        ours = kernels.make(spec)

        def plain(x):
            gram, sq, _ = closed_form.flat_gram(x, x)
            return ours.from_gram(gram, sq, sq, 32, same=True)

        def gradients(w):
            loss = lambda k: jnp.sum(w * k) + jnp.sum(jnp.sin(k) * (w * w))  # noqa: E731
            return (jax.grad(lambda x: loss(kernels.self_kernel(ours, x, symmetric_use=True)))(x),
                    jax.grad(lambda x: loss(plain(x)))(x))

        np.testing.assert_array_equal(kernels.self_kernel(ours, x, symmetric_use=True), plain(x))
        assert _relative(*gradients(weight + weight.T)) < 1e-13
        assert _relative(*gradients(weight)) > 1e-3


def test_kip_step_in_float32_matches_float64_after_the_kss_change(rng):
    """The float32 KIP loss and support gradient (K_ss's one-matmul backward under krr.fit's
    symmetric gradient, polynomial arc-cosine) against the same computation in float64 (where the
    arc-cosine is np.arccos's). Tolerance: float32 kernel entries round by ~sqrt(d) u = 3.6e-7
    relative (length-36 dot products, probabilistic bound), and the solve amplifies that by at most
    cond(K_ss + ridge), which is 14 here (the ridge 1e-3 tr/n caps it at 1 + n/reg = 2e4 in
    general): <= 5e-6. The loss's 1e-5 is 2x that; the gradient's 1e-4 is 20x, as its backward
    pass adds rounding of the same order again. Measured: 1.9e-7 and 4.3e-7."""
    spec = KernelConfig()
    x_s = rng.standard_normal((20, 6, 6, 1))
    x_t = rng.standard_normal((60, 6, 6, 1))
    y_s, y_t = rng.standard_normal((20, 3)), rng.standard_normal((60, 3))

    def value_and_grad(dtype):
        kernel_fn = kernels.make(spec)
        fn = jax.value_and_grad(lambda xs: kip.kip_loss(kernel_fn, 1e-3, kip.Support(xs, jnp.asarray(y_s, dtype)),
                                                        jnp.asarray(x_t, dtype), jnp.asarray(y_t, dtype)))
        return fn(jnp.asarray(x_s, dtype))

    loss32, grad32 = value_and_grad(jnp.float32)
    with enable_x64():
        loss64, grad64 = value_and_grad(jnp.float64)
        assert float(loss32) == pytest.approx(float(loss64), rel=1e-5)
        assert _relative(grad32, grad64) < 1e-4


def test_arccos_polynomial_meets_its_published_bound_in_float64():
    """The A&S 4.4.46 polynomial (its coefficients as typed) against NumPy's float64 arccos. A&S
    give |error| <= 2e-8 (one digit); the tabulated coefficients reach pi/2 - 1.5707963050 =
    2.18e-8 at a = 0, their largest error. In float64 the evaluation adds ~1e-16, so 2.2e-8 holds
    the formula to its own accuracy: a changed coefficient digit that moves the error (a swap of
    two digits raises it to 2.4e-8 or more) fails, as float32 rounding (~2e-7) used to hide."""
    grid = np.linspace(0.0, 1.0, 100_001)
    with enable_x64():
        approx = np.asarray(closed_form._acos_polynomial(jnp.asarray(grid, jnp.float64)))
    assert approx.dtype == np.float64
    assert np.max(np.abs(approx - np.arccos(grid))) <= 2.2e-8


def test_float32_arccos_is_the_polynomial_within_rounding():
    """The float32 path (both signs) against NumPy's float64 arccos of the same float32 inputs.
    Error analysis, u = 2^-24: Horner's 7 multiply-adds contribute at most 1.4u relative (the
    partial sums after the first are below 0.22, against P >= 1.41), then 1 - a (0.5u after the
    root), the root and the product u each: 3.9u relative on the half-angle, below 4u. For c < 0
    add pi's rounding to float32 (8.7e-8) and the subtraction's u * pi. Plus the formula's 2.2e-8."""
    grid = np.linspace(-1.0, 1.0, 200_001).astype(np.float32)
    approx = np.asarray(closed_form._arccos_value(jnp.asarray(grid)), np.float64)
    exact = np.arccos(grid.astype(np.float64))
    u = 2.0 ** -24
    half = np.arccos(np.abs(grid).astype(np.float64))
    pi_rounding = abs(float(np.float32(np.pi)) - np.pi)
    bound = 2.2e-8 + 4 * u * half + np.where(grid < 0, pi_rounding + u * np.pi, 0.0)
    excess = np.abs(approx - exact) - bound
    assert excess.max() <= 0, f"error above the bound by {excess.max():.2g} at c = {grid[excess.argmax()]}"


def test_target_blocks_equal_one_block(rng):
    """Blocked targets (padding, recomputation) give the loss and gradient of one block.
    Consistency check, not a reference (the one-block loss is held to the paper's formula above).
    In float64 only the order of the sums over 50 targets and the kernel blocks' rounding differ:
    ~(n_t + n_s + d) eps = 1.6e-14 relative, times cond(K_ss + ridge) = 5.3 for the gradients:
    ~8e-14. 1e-12 leaves >= 12x on both (measured <= 8.5e-16); a padded row that counts, or a
    missing block, is off by O(1)."""
    kernel_fn = kernels.make(KernelConfig())
    with enable_x64():
        support = kip.Support(jnp.asarray(rng.standard_normal((6, 4, 4, 1))), jnp.asarray(rng.standard_normal((6, 3))))
        x_t = jnp.asarray(rng.standard_normal((50, 4, 4, 1)))
        y_t = jnp.asarray(rng.standard_normal((50, 3)))
        whole = jax.value_and_grad(lambda s: kip.kip_loss(kernel_fn, 1e-3, s, x_t, y_t))(support)
        for targets in (7, 25):  # with padding, and without
            block = targets * 6 + 5  # entries: 6 support images; the remainder must not count
            blocked = jax.value_and_grad(lambda s: kip.kip_loss(kernel_fn, 1e-3, s, x_t, y_t, kernel_block=block))(support)
            assert float(blocked[0]) == pytest.approx(float(whole[0]), rel=1e-12)
            assert _relative(blocked[1].images, whole[1].images) < 1e-12
            assert _relative(blocked[1].labels, whole[1].labels) < 1e-12


def test_step_compiles_once_across_target_batches(digits_standardized):
    x_train, y_train, _, _ = digits_standardized
    optimizer = optax.adam(0.01)
    support = kip.Support(jnp.asarray(x_train[:20]), jnp.asarray(np.eye(10)[y_train[:20]] - 0.1, jnp.float32))
    state = optimizer.init(support)
    step = kip.make_step(kernels.make(KernelConfig()), optimizer, DistillConfig(reg=1e-6, learn_labels=True))
    x_dev, y_dev = jnp.asarray(x_train), jnp.asarray(np.eye(10)[y_train] - 0.1, jnp.float32)
    for seed in range(4):
        idx = kip.target_indices(y_train, 10, 200, seed=seed, step=seed)
        support, state, _ = step(support, state, x_dev, y_dev, idx)
    assert step._cache_size() == 1


def _relu_fc_reference(x1: np.ndarray, x2: np.ndarray, spec: KernelConfig) -> np.ndarray:
    """NNGP or NTK (ntk parameterisation) of an FC ReLU network between two sets, by the
    arc-cosine recursion in NumPy float64 with the cosine clipped to [-1, 1] (Cho & Saul 2009 for
    the NNGP, Jacot et al. 2018 for the NTK), as tests/test_kernels.py writes one layer of it."""
    a, b = x1.reshape(len(x1), -1).astype(np.float64), x2.reshape(len(x2), -1).astype(np.float64)
    w2, b2 = spec.w_std ** 2, spec.b_std ** 2
    nngp = w2 * a @ b.T / a.shape[1] + b2
    q1, q2 = w2 * np.sum(a * a, 1) / a.shape[1] + b2, w2 * np.sum(b * b, 1) / a.shape[1] + b2
    ntk = nngp.copy()
    for _ in range(spec.depth):
        scale = np.sqrt(np.outer(q1, q2))
        cosine = np.clip(nngp / scale, -1.0, 1.0)
        theta = np.arccos(cosine)
        nngp = w2 * scale * (np.sin(theta) + (np.pi - theta) * cosine) / (2 * np.pi) + b2
        ntk = nngp + w2 * ntk * (np.pi - theta) / (2 * np.pi)
        q1, q2 = w2 * q1 / 2 + b2, w2 * q2 / 2 + b2
    return ntk if spec.kind == "ntk" else nngp


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", [KernelConfig(kind="ntk", depth=3, b_std=0.0), KernelConfig(kind="nngp", depth=1, b_std=0.0)],
                         ids=["ntk-d3", "nngp-d1"])
def test_parallel_and_opposite_pairs_across_two_sets(rng, spec, dtype):
    """K(x, [x; -x]) between two sets, so nothing pins the cosine: each copy is at angle 0 and each
    negative at angle pi (no bias, so at every layer). Rounding puts the computed cosine just
    outside [-1, 1] on some of these pairs; the clips and the derivative's sin t = 0 case must keep
    the kernel and its gradient finite (KIP meets such pairs: its targets are drawn from the images
    its support starts as). Reference: the arc-cosine recursion in NumPy float64
    (`_relu_fc_reference`). Tolerance: on a parallel pair the computed cosine is 1 - O(eps), an
    angle of O(sqrt(eps)) (closed_form._relu), which moves the NTK's (pi - t)/2pi factor by
    O(sqrt(eps)) relative per layer (measured 4e-4 in float32, 2e-8 in float64, at depth 3):
    10 sqrt(eps) of the largest entry."""
    x = rng.standard_normal((20, 4, 4, 2))
    other = np.concatenate([x, -x])
    kernel_fn = kernels.make(spec)
    with enable_x64(dtype == "float64"):
        x1, x2 = jnp.asarray(x, dtype), jnp.asarray(other.copy(), dtype)
        k = np.asarray(kernel_fn(x1, x2), np.float64)
        weight = jnp.asarray(rng.standard_normal((20, 40)), dtype)
        grad = np.asarray(jax.grad(lambda a: jnp.sum(weight * kernel_fn(a, x2)))(x1))
    expected = _relu_fc_reference(x, other, spec)
    np.testing.assert_allclose(k, expected, rtol=0, atol=10 * np.sqrt(np.finfo(dtype).eps) * np.abs(expected).max())
    assert np.isfinite(grad).all()


def test_rbf_stays_at_most_one_where_rounding_makes_distances_negative(rng):
    """exp(-gamma max(|x|^2 + |x'|^2 - 2 x.x', 0) / d) <= 1 for any inputs. Far from the origin
    (pixels ~1000, |x|^2 ~ 3e7) float32 rounds that squared distance by ~eps |x|^2 ~ 2 either way,
    so on copies (distance 0) it comes out negative by more than 1; the clamp at 0 must hold every
    value to the bound. (How far below 1 the copies come out is float32's cancellation, not tested.)"""
    x = 1000.0 + rng.standard_normal((30, 4, 4, 2))
    kernel_fn = kernels.make(KernelConfig(architecture="rbf"))
    k = np.asarray(kernel_fn(jnp.asarray(x, jnp.float32), jnp.asarray(x.copy(), jnp.float32)))
    assert k.max() <= 1.0


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_derivative_along_the_inputs_at_parallel_and_opposite_pairs_is_the_kernel(rng, kind):
    """With no bias an FC ReLU kernel is positively homogeneous of degree 1 in each input:
    K(l x, x') = l K(x, x') for l > 0 (the first layer scales the covariance by l and the variance
    by l^2, the arc-cosine map keeps the angle and scales by sqrt(q q')). By Euler's theorem the
    derivative of f(x) = sum(W * K(x, x')) along x itself is f(x). That is the reference, in forward
    mode (jax.jvp: the custom JVP rules as written) and in reverse mode, at x' = [x; -x], where
    rounding clips the cosine to +-1 and sin t = 0 (`_arccos_jvp`'s special case). Tolerance: in
    float64 those pairs' angles come out O(sqrt(eps)) = 1e-8 instead of 0 or pi, which moves the
    derivative kernel by about that, relatively; 1e-6."""
    kernel_fn = kernels.make(KernelConfig(kind=kind, depth=3, b_std=0.0))
    x = rng.standard_normal((20, 4, 4, 2))
    with enable_x64():
        x1, x2 = jnp.asarray(x), jnp.asarray(np.concatenate([x, -x]))
        weight = jnp.asarray(rng.standard_normal((20, 40)))
        f = lambda a: jnp.sum(weight * kernel_fn(a, x2))  # noqa: E731
        value, forward = jax.jvp(f, (x1,), (x1,))
        reverse = jnp.sum(jax.grad(f)(x1) * x1)
        assert float(forward) == pytest.approx(float(value), rel=1e-6)
        assert float(reverse) == pytest.approx(float(value), rel=1e-6)


def test_a_gram_kernel_called_as_its_type_says_is_a_cross_kernel(rng):
    """`closed_form.GramKernel` is k(gram, sq1, sq2, same=False): called without `same`, on two
    different sets (7 and 5 images), it is the plain cross kernel. Reference: the arc-cosine
    recursion in NumPy float64 (`_relu_fc_reference`); both float64, no clipped or pinned pairs:
    they agree to rounding, ~1e-15 relative; 1e-10."""
    spec = KernelConfig(kind="ntk", depth=2)
    x1, x2 = rng.standard_normal((7, 4, 4, 2)), rng.standard_normal((5, 4, 4, 2))
    with enable_x64():
        gram, sq1, sq2 = closed_form.flat_gram(jnp.asarray(x1), jnp.asarray(x2))
        k = np.asarray(closed_form.gram_kernel(spec, 32)(gram, sq1, sq2))
    np.testing.assert_allclose(k, _relu_fc_reference(x1, x2, spec), rtol=1e-10)
