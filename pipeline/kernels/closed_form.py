"""Closed-form FC and RBF kernels, computed from one Gram matrix of dot products.

Why we write these by hand instead of calling neural-tangents: a KIP step spends its time on
K_ss and K_ts and their gradients. For a fully-connected network every kernel entry is a function
of three numbers only: x.x', |x|^2 and |x'|^2. Computing the Gram matrix once per pair of sets and
applying the layer recursion entry-wise leaves the Gram matmul (and its transpose in the backward
pass) as the only heavy work. neural-tangents' general `Kernel` machinery carries more state
through every layer and differentiates through `arctan2`, which XLA:CPU runs as a scalar loop;
on benchmarks/kip_step.py its step is 1.3x to 1.5x slower than ours in the same process, and ours
runs at 46-94 % of the rate of its own matmul shapes (docs/scaling.md; the share falls as the support grows).

The recursion is neural-tangents' own (stax.Dense, stax.Relu, stax.Erf), layer for layer and
in the same order, so both parameterisations agree with it to float rounding; a test checks that
(tests/test_closed_form.py). For ReLU we give the arc-cosine map J(c) its analytic derivative,
(pi - theta) / (2 pi): the derivative of arccos is infinite at c = +-1 (every diagonal entry of
K_ss), but J's is finite, so the backward pass needs no guards and no extra transcendental calls.
In float32 the arc-cosine itself is a degree-7 polynomial (Abramowitz & Stegun 4.4.46, error
<= 2e-8 in exact arithmetic, 4e-7 measured in float32, where jnp.arccos measures 3e-7): XLA:CPU
lowers arccos to a scalar loop, 52 ms over 5M entries against 3 ms for the polynomial.

    Sigma_1 = w^2 x.x'/d + b^2                                  (first Dense)
    Sigma_{l+1} = w^2 sqrt(q q') J(c) + b^2,  c = Sigma_l / sqrt(q q')   (ReLU, then Dense)
    Theta_{l+1} = Sigma_{l+1} + w^2 Theta_l * dSigma_l                  (ntk parameterisation)
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from pipeline.run.config import KernelConfig

GramKernel = Callable[..., jax.Array]
"""k(gram, sq1, sq2, same=False) -> kernel, with gram = x1 @ x2.T and sq = squared row norms of the
flattened images; `same=True` says x1 is x2, so the diagonal pairs are exactly parallel."""


def supports(spec: KernelConfig) -> bool:
    """Kernels that depend on inputs only through dot products and norms."""
    return spec.architecture in ("fc", "rbf")


def gram_kernel(spec: KernelConfig, input_dim: int) -> GramKernel:
    """The kernel of `spec` as a function of the Gram matrix and the squared norms."""
    if spec.architecture == "rbf":
        gamma = spec.gamma

        def rbf(gram, sq_row, sq_col, diagonal):
            sq_dist = sq_row + sq_col - 2.0 * gram
            return jnp.exp(-gamma * jnp.maximum(sq_dist, 0.0) / input_dim)

        return _entrywise_kernel(rbf)
    if spec.architecture != "fc":
        raise ValueError(f"no closed form for kernel.architecture={spec.architecture!r}; expected fc or rbf")
    return _entrywise_kernel(_fc_map(spec, input_dim))


def flat_gram(x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x1 @ x2.T, |x1|^2, |x2|^2) over flattened images."""
    a = x1.reshape(x1.shape[0], -1)
    b = x2.reshape(x2.shape[0], -1)
    return a @ b.T, squared_norms(a), squared_norms(b)


def self_gram(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x @ x.T, |x|^2) over flattened images, for a kernel of a set with itself (K_ss).

    Differentiate it only under a symmetric cotangent (kernels.self_kernel symmetrises it, or its
    caller promises one with symmetric_use=True, as kip_loss does for krr.fit's): see
    `_gram_of_symmetric_use`.
    """
    a = x.reshape(x.shape[0], -1)
    return _gram_of_symmetric_use(a), squared_norms(a)


@jax.custom_vjp
def _gram_of_symmetric_use(a: jax.Array) -> jax.Array:
    """a @ a.T, whose backward pass is one matmul, 2 G a, where autodiff does two, G a + G^T a.

    That is 2 n^2 d FLOPs fewer (one 3000 x 3000 x 784 matmul is 67 ms here), and exact when the
    cotangent G is symmetric, which it is when the Gram matrix feeds a symmetric kernel whose own
    cotangent is symmetric (kernels.self_kernel). Symmetrising G itself, (G + G^T) a, would be
    general but is slower on XLA:CPU: it fuses the kernel map's backward pass into the transposed
    add and computes every entry twice, strided (optimization barriers are removed on CPU).
    """
    return a @ a.T


def _gram_forward(a):
    return a @ a.T, a


def _gram_backward(a, cotangent):
    return (2.0 * (cotangent @ a),)


_gram_of_symmetric_use.defvjp(_gram_forward, _gram_backward)


def squared_norms(x: jax.Array) -> jax.Array:
    """Row sums of squares as a matrix-vector product: XLA:CPU runs jnp.sum(x * x, 1) as a
    reduce-window, an order of magnitude slower (12 ms against 1 ms for 5000 MNIST images)."""
    return (x * x) @ jnp.ones(x.shape[1], x.dtype)


def _entrywise_kernel(entrywise: Callable) -> GramKernel:
    """Broadcast the norms against the Gram matrix and mark the diagonal of a self-kernel."""

    def kernel(gram, sq1, sq2, same=False):
        diagonal = jnp.eye(gram.shape[0], dtype=bool) if same else None
        return entrywise(gram, sq1[:, None], sq2[None, :], diagonal)

    return kernel


def _fc_map(spec: KernelConfig, input_dim: int) -> Callable:
    """neural-tangents' FC recursion, entry-wise on (gram, row norms, column norms)."""
    w2, b2 = spec.w_std ** 2, spec.b_std ** 2
    relu = spec.activation == "relu"
    standard = spec.parameterization == "standard"
    want_ntk = spec.kind == "ntk"

    def dense(nngp, var1, var2, ntk, fan_in):
        """stax.Dense: affine map of the covariances; the NTK gains the layer's own gradient term."""
        if want_ntk:
            if standard:
                ntk = fan_in * nngp + w2 * ntk + (1.0 if spec.b_std is not None else 0.0)
            else:
                ntk = (w2 * nngp + b2) + w2 * ntk
        return w2 * nngp + b2, w2 * var1 + b2, w2 * var2 + b2, ntk

    def entrywise(gram, sq_row, sq_col, diagonal):
        nngp = gram / input_dim
        var1, var2 = sq_row / input_dim, sq_col / input_dim
        ntk = jnp.zeros_like(nngp) if want_ntk else None
        fan_in = input_dim
        for _ in range(spec.depth):
            nngp, var1, var2, ntk = dense(nngp, var1, var2, ntk, fan_in)
            if relu:
                nngp, var1, var2, dot = _relu(nngp, var1, var2, diagonal)
            else:
                nngp, var1, var2, dot = _erf(nngp, var1, var2)
            if want_ntk:
                ntk = ntk * dot
            fan_in = 1  # the infinite-width kernel is built with width-1 layers (see kernels.stax_network)
        nngp, var1, var2, ntk = dense(nngp, var1, var2, ntk, fan_in)
        return ntk if want_ntk else nngp

    return entrywise


def _relu(nngp, var1, var2, diagonal=None):
    """ReLU's arc-cosine map: new covariances and the derivative kernel E[relu'(u) relu'(v)].

    diagonal: where x1[i] is x2[j]. Their cosine is 1 exactly; computed, it is 1 - O(eps), and the
    arc-cosine turns that into an O(sqrt(eps)) angle (3e-4 in float32), so we pin it.
    """
    scale, cosine = _scale_and_cosine(nngp, var1, var2)
    if diagonal is not None:
        cosine = jnp.where(diagonal, 1.0, cosine)
    slope = (math.pi - _arccos(cosine)) / (2 * math.pi)
    return scale * _arccos_map(cosine), var1 / 2, var2 / 2, slope


@jax.custom_jvp
def _scale_and_cosine(nngp, var1, var2):
    """sqrt(var1 var2) and nngp / sqrt(var1 var2), for a column var1 and a row var2.

    The roots and reciprocals are taken once per image, so each of the n1 x n2 entries pays
    multiplications, not a square root and a division. Autodiff of that form would reduce over
    rows and over columns twice each (once through the scale, once through the cosine); the JVP
    below goes through d log(scale) alone, so the backward pass reduces once per side, as
    autodiff of sqrt(var1 * var2) did.
    """
    root1, root2 = jnp.sqrt(var1), jnp.sqrt(var2)
    return root1 * root2, nngp * ((1.0 / root1) * (1.0 / root2))


@_scale_and_cosine.defjvp
def _scale_and_cosine_jvp(primals, tangents):
    nngp, var1, var2 = primals
    d_nngp, d_var1, d_var2 = tangents
    root1, root2 = jnp.sqrt(var1), jnp.sqrt(var2)
    inverse = (1.0 / root1) * (1.0 / root2)
    scale, cosine = root1 * root2, nngp * inverse
    d_log_scale = 0.5 * (d_var1 / var1) + 0.5 * (d_var2 / var2)
    return (scale, cosine), (scale * d_log_scale, d_nngp * inverse - cosine * d_log_scale)


@jax.custom_jvp
def _arccos_map(cosine):
    """J(c) = (sin t + (pi - t) c) / 2pi with t = arccos c; |c| > 1 from rounding is clipped."""
    c = jnp.clip(cosine, -1.0, 1.0)
    return (jnp.sqrt(1.0 - c * c) + (math.pi - _arccos_value(c)) * c) / (2 * math.pi)


@_arccos_map.defjvp
def _arccos_map_jvp(primals, tangents):
    (cosine,), (d_cosine,) = primals, tangents
    slope = (math.pi - _arccos_value(jnp.clip(cosine, -1.0, 1.0))) / (2 * math.pi)
    return _arccos_map(cosine), slope * d_cosine


@jax.custom_jvp
def _arccos(cosine):
    return _arccos_value(jnp.clip(cosine, -1.0, 1.0))


# Abramowitz & Stegun 4.4.46: arccos(x) = sqrt(1 - x) * P(x) on [0, 1], |error| <= 2e-8.
_ACOS_COEFFS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
                0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def _arccos_value(c):
    """arccos on [-1, 1]: exact in float64, the vectorisable polynomial in float32 and below."""
    if c.dtype == jnp.float64:
        return jnp.arccos(c)
    a = jnp.abs(c)
    half = _acos_polynomial(a)
    return jnp.where(c < 0, math.pi - half, half)


def _acos_polynomial(a):
    """sqrt(1 - a) * P(a), A&S 4.4.46's arccos(a) for a in [0, 1], evaluated in a's dtype (Horner).

    Separate so a test can evaluate it in float64, where its error is the formula's own."""
    poly = jnp.full_like(a, _ACOS_COEFFS[-1])
    for coeff in _ACOS_COEFFS[-2::-1]:
        poly = poly * a + coeff
    return jnp.sqrt(1.0 - a) * poly


@_arccos.defjvp
def _arccos_jvp(primals, tangents):
    """d arccos = -dc / sin t, and 0 where sin t == 0: there (x = x', the diagonal of K_ss) the
    cosine cannot change to first order, so any finite multiplier is exact; infinity would be NaN."""
    (cosine,), (d_cosine,) = primals, tangents
    c = jnp.clip(cosine, -1.0, 1.0)
    sine = jnp.sqrt(1.0 - c * c)  # as `_arccos_map` computes it, so XLA computes it once for both
    return _arccos(cosine), jnp.where(sine > 0, -d_cosine / jnp.where(sine > 0, sine, 1.0), 0.0)


def _erf(nngp, var1, var2):
    """Erf's arc-sine map (Williams 1997) and its derivative kernel."""
    d1, d2 = 1.0 + 2.0 * var1, 1.0 + 2.0 * var2
    prod = d1 * d2
    root = jnp.sqrt(jnp.maximum(prod - 4.0 * nngp * nngp, 1e-30))
    new = (2 / math.pi) * jnp.arctan2(2.0 * nngp, root)
    diag = lambda v: (2 / math.pi) * jnp.arctan2(v, jnp.sqrt(v + 0.25))
    return new, diag(var1), diag(var2), (4 / math.pi) / root
