"""Kernels against references that do not use our code: closed forms and wide random networks."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from sklearn.metrics.pairwise import rbf_kernel

from pipeline.kernels import functions as kernels
from pipeline.run.config import KernelConfig

W_STD, B_STD = math.sqrt(2.0), 0.1


def relu_one_layer_closed_form(x: np.ndarray, w_std: float, b_std: float) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK of a one-hidden-layer ReLU net, NTK parameterisation (Cho & Saul 2009; Jacot et al. 2018).

    K0 = w^2 x.x'/d + b^2;  E[relu relu] = sqrt(K11 K22)/(2 pi) (sin t + (pi - t) cos t);
    E[relu' relu'] = (pi - t)/(2 pi);  NNGP = w^2 E[relu relu] + b^2;  NTK = NNGP + w^2 E[relu' relu'] K0.
    """
    flat = x.reshape(len(x), -1).astype(np.float64)
    k0 = w_std**2 * flat @ flat.T / flat.shape[1] + b_std**2
    diag = np.sqrt(np.diag(k0))
    cos = np.clip(k0 / np.outer(diag, diag), -1.0, 1.0)
    theta = np.arccos(cos)
    e_relu = np.outer(diag, diag) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    e_step = (np.pi - theta) / (2 * np.pi)
    nngp = w_std**2 * e_relu + b_std**2
    ntk = nngp + w_std**2 * e_step * k0
    return nngp, ntk


def erf_one_layer_nngp(x: np.ndarray, w_std: float, b_std: float) -> np.ndarray:
    """Williams (1997): E[erf(u) erf(v)] = 2/pi arcsin(2 K12 / sqrt((1 + 2 K11)(1 + 2 K22)))."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    k0 = w_std**2 * flat @ flat.T / flat.shape[1] + b_std**2
    d = 1 + 2 * np.diag(k0)
    return w_std**2 * (2 / np.pi) * np.arcsin(2 * k0 / np.sqrt(np.outer(d, d))) + b_std**2


def wide_relu_network_kernels(x: np.ndarray, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Empirical NNGP and NTK of one random width-`width` ReLU network, in plain NumPy.

    f(x) = w/sqrt(n) v.relu(w/sqrt(d) W x + b b1) + b b2 with standard-normal parameters.
    NNGP_hat = w^2/n sum_j h_j h_j' + b^2 (expectation over the readout only); the NTK is the exact
    inner product of parameter gradients of this one network.
    """
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1).astype(np.float64)
    d = flat.shape[1]
    weights = rng.standard_normal((d, width))
    bias = rng.standard_normal(width)
    readout = rng.standard_normal(width)
    pre = W_STD / np.sqrt(d) * flat @ weights + B_STD * bias
    hidden = np.maximum(pre, 0.0)
    step = (pre > 0).astype(np.float64)
    nngp = W_STD**2 / width * hidden @ hidden.T + B_STD**2
    k0 = W_STD**2 * flat @ flat.T / d + B_STD**2
    first_layer = W_STD**2 / width * (step * readout**2) @ step.T * k0
    return nngp, nngp + first_layer


@pytest.fixture
def images(rng):
    return rng.standard_normal((7, 4, 4, 2)).astype(np.float32)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_fc_relu_matches_arccos_closed_form(images, kind):
    """Reference: the Cho & Saul arc-cosine closed form above, in float64 NumPy (np.arccos).
    Tolerance: ours runs in float32; each entry starts from a length-d dot product (d = 32), whose
    worst-case rounding is d u = 1.9e-6 relative (u = 2^-24), and the arc-cosine maps are
    well-conditioned away from c = +-1 (plus the polynomial's 2.2e-8): rtol 2e-5 is 10x that
    (measured: 3.4e-7 absolute, 1.6e-6 relative at worst). A wrong factor in the map is off by O(1)."""
    nngp, ntk = relu_one_layer_closed_form(images, W_STD, B_STD)
    expected = nngp if kind == "nngp" else ntk
    kernel_fn = kernels.make(KernelConfig(kind=kind, depth=1, w_std=W_STD, b_std=B_STD))
    np.testing.assert_allclose(np.asarray(kernel_fn(images, images)), expected, rtol=2e-5, atol=1e-6)


def test_fc_relu_depth_two_composes_the_closed_form(images):
    """Depth 2 = the arc-cosine map applied twice (NNGP); checks that depth is wired through.
    Reference: the closed form composed in float64 NumPy. Tolerance as for depth 1: the float32
    Gram's worst-case d u = 1.9e-6 relative, carried through two maps of slope <= 1/2; rtol 2e-5
    is 10x that (measured 1.9e-7 absolute)."""
    nngp1, _ = relu_one_layer_closed_form(images, W_STD, B_STD)
    diag = np.sqrt(np.diag(nngp1))
    cos = np.clip(nngp1 / np.outer(diag, diag), -1, 1)
    theta = np.arccos(cos)
    nngp2 = W_STD**2 * np.outer(diag, diag) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos) + B_STD**2
    kernel_fn = kernels.make(KernelConfig(kind="nngp", depth=2))
    np.testing.assert_allclose(np.asarray(kernel_fn(images, images)), nngp2, rtol=2e-5, atol=1e-6)


def test_fc_erf_matches_williams_closed_form(images):
    """Reference: Williams' (1997) arc-sine closed form in float64 NumPy. Tolerance: the float32
    Gram's worst-case d u = 1.9e-6 relative (d = 32), amplified at most 1.8x by arcsin at these
    inputs (|argument| <= 0.83); rtol 2e-5 is ~6x that (measured 2.9e-7 relative)."""
    kernel_fn = kernels.make(KernelConfig(kind="nngp", activation="erf", w_std=1.3, b_std=0.2))
    expected = erf_one_layer_nngp(images, 1.3, 0.2)
    np.testing.assert_allclose(np.asarray(kernel_fn(images, images)), expected, rtol=2e-5, atol=1e-6)


def test_standard_parameterization_has_the_same_nngp(images):
    """NNGP does not depend on the parameterisation; the NTK does (that is the point of it).
    Consistency check, not a reference: our kernel against itself under the other parameterisation
    (the closed forms above are the references). Today both run the same float32 operations
    (bit-identical); rtol 1e-5 allows a reordered float32 evaluation (worst case d u = 1.9e-6)."""
    ntk_param = KernelConfig(kind="nngp", parameterization="ntk")
    standard = KernelConfig(kind="nngp", parameterization="standard")
    np.testing.assert_allclose(
        np.asarray(kernels.make(standard)(images, images)),
        np.asarray(kernels.make(ntk_param)(images, images)), rtol=1e-5,
    )
    assert not np.allclose(
        kernels.make(KernelConfig(kind="ntk", parameterization="standard"))(images, images),
        kernels.make(KernelConfig(kind="ntk"))(images, images),
    )


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_fc_relu_matches_a_wide_random_network(images, kind):
    """Monte-Carlo reference: the exact kernel of one random width-n network (n = 100k), in NumPy.
    It is a mean of n i.i.d. per-unit terms; for ReLU, E[relu^4] / E[relu^2]^2 = 6, so a diagonal
    term has relative standard deviation sqrt(5) and the mean sqrt(5/n) = 7.1e-3 (computed per
    entry from the units: <= 7.0e-3 of the largest entry for the NNGP, 5.4e-3 for the NTK). 0.03
    is >= 4.3 standard errors: over the 28 distinct entries a chance failure has probability
    < 28 x 1.7e-5 = 5e-4 (measured: 1.5e-2 and 1.0e-2, 2.3 and 2.2 standard errors). A wrong
    factor in the arc-cosine map (e.g. 1/pi for 1/2pi) is off by 50 % or more."""
    nngp_hat, ntk_hat = wide_relu_network_kernels(images, width=100_000, seed=0)
    empirical = nngp_hat if kind == "nngp" else ntk_hat
    kernel_fn = kernels.make(KernelConfig(kind=kind))
    exact = np.asarray(kernel_fn(images, images), np.float64)
    scale = np.abs(exact).max()
    assert np.abs(empirical - exact).max() / scale < 0.03


def test_rbf_matches_sklearn(images):
    """Reference: scikit-learn's rbf_kernel (distances accumulated in float64, returned in float32).
    Tolerance: our float32 squared distance |x|^2 + |x'|^2 - 2 x.x' carries ~sqrt(d) u (|x| + |x'|)^2
    of rounding (probabilistic bound; d u in the worst case), d = 32, times gamma/d in the exponent:
    ~1.4e-6 relative (worst case 8e-6). rtol 1e-5 is 7x the former (measured 2.4e-7)."""
    gamma = 0.7
    flat = images.reshape(len(images), -1)
    expected = rbf_kernel(flat, flat, gamma=gamma / flat.shape[1])
    kernel_fn = kernels.make(KernelConfig(architecture="rbf", gamma=gamma))
    np.testing.assert_allclose(np.asarray(kernel_fn(images, images)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [
    KernelConfig(),
    KernelConfig(architecture="rbf"),
    pytest.param(KernelConfig(architecture="conv", depth=1), marks=pytest.mark.exact),
], ids=["fc", "rbf", "conv"])
def test_blocked_kernel_matrix_equals_one_shot(rng, spec):
    """Consistency check, not a reference: kernel_matrix's padded blocks against one call of the
    same kernel. Only float32 rounding may differ (XLA compiles the two shapes differently; measured
    <= 2.4e-7 absolute, 2 ulps of the largest entry); rtol 1e-5 is ~7x the worst-case d u = 1.5e-6
    of a reordered entry (d = 25 here), while a misplaced or padded-in row is off by O(1)."""
    x1 = rng.standard_normal((23, 5, 5, 1)).astype(np.float32)
    x2 = rng.standard_normal((9, 5, 5, 1)).astype(np.float32)
    kernel_fn = kernels.make(spec)
    blocked = kernels.kernel_matrix(kernel_fn, x1, x2, block_size=4)
    np.testing.assert_allclose(blocked, np.asarray(kernel_fn(x1, x2)), rtol=1e-5, atol=1e-6)


@pytest.mark.exact
def test_conv_kernel_is_symmetric_positive_semidefinite(rng):
    """Property check (no reference): symmetry to float32 rounding (measured 3.8e-7 relative) and
    no eigenvalue below -1e-4 of the largest entry (rounding can push one below 0 by ~n u |k|,
    4e-7; the smallest measured is +1.6e-2)."""
    x = rng.standard_normal((6, 6, 6, 1)).astype(np.float32)
    for readout in ("flatten", "gap"):
        k = np.asarray(kernels.make(KernelConfig(architecture="conv", conv_readout=readout))(x, x), np.float64)
        np.testing.assert_allclose(k, k.T, rtol=1e-5)
        assert np.linalg.eigvalsh(k).min() > -1e-4 * np.abs(k).max()


def conv_relu_flatten_nngp(x: np.ndarray, w_std: float, b_std: float) -> np.ndarray:
    """NNGP of conv(3x3, SAME) -> ReLU -> flatten -> dense, written out: for each pixel p the
    pre-activation covariance is w^2/(9 C) sum over the zero-padded 3x3 patch of x.x' + b^2; the
    readout averages the arc-cosine map of it over pixels (Novak et al. 2019, Garriga-Alonso et al. 2019)."""
    n, h, w, c = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack(
        [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
    ).reshape(n, h * w, -1)
    k0 = w_std**2 / (9 * c) * np.einsum("apk,bpk->abp", patches, patches) + b_std**2
    diag = np.sqrt(np.einsum("aap->ap", k0))
    norms = diag[:, None, :] * diag[None, :, :]
    cos = np.clip(k0 / norms, -1, 1)
    theta = np.arccos(cos)
    e_relu = norms / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    return w_std**2 * e_relu.mean(axis=-1) + b_std**2


@pytest.mark.exact
def test_conv_relu_flatten_matches_closed_form(rng):
    """Reference: the per-pixel arc-cosine closed form above (float64 NumPy) against
    neural-tangents' float32 conv kernel. Tolerance: each pixel's covariance is a length-18 patch
    dot product (worst-case rounding 18 u = 1.1e-6 relative), passed through a map of slope <= 1/2
    and averaged over pixels; rtol 2e-5 is ~20x that (measured 1.5e-7 relative)."""
    x = rng.standard_normal((5, 4, 5, 2)).astype(np.float32)
    kernel_fn = kernels.make(KernelConfig(architecture="conv", kind="nngp", conv_readout="flatten"))
    np.testing.assert_allclose(
        np.asarray(kernel_fn(x, x)), conv_relu_flatten_nngp(x, W_STD, B_STD), rtol=2e-5, atol=1e-6
    )


def test_without_neural_tangents_the_exact_conv_kernel_names_the_extra(monkeypatch):
    """The core never needs neural-tangents; the one kernel that does says which install brings it."""
    from pipeline.errors import UserError

    monkeypatch.setitem(sys.modules, "neural_tangents", None)  # `import neural_tangents` fails as if absent
    x = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(UserError, match=r"kernel.architecture=conv .*needs neural-tangents.*'\.\[full,exact\]'"):
        kernels.make(KernelConfig(architecture="conv", depth=1))(x, x)
