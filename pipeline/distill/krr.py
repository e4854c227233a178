"""Kernel ridge regression: the regularised solve, predictions, scores, and Label Solve.

The ridge is scaled by the kernel's mean diagonal, lambda * tr(K)/n, as in the KIP paper's code,
so one `reg` value means the same thing for kernels of any scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_factor, cho_solve, cholesky

from pipeline.run import runtime


def ridge(k_ss: jax.Array, reg: float) -> jax.Array:
    """The scalar added to K_ss's diagonal: reg * tr(K_ss) / n."""
    return reg * _trace(k_ss) / k_ss.shape[0]


def _trace(k: jax.Array) -> jax.Array:
    """The sum of k's n diagonal entries, read as every (n + 1)-th entry of the flattened matrix.

    jnp.trace masks all n^2 entries and sums them; XLA:CPU writes the masked matrix out first
    (36 MB at a 3000-image support) and does the same for its gradient (`_regularised`)."""
    return jnp.sum(k.reshape(-1)[:: k.shape[0] + 1])


@jax.custom_vjp
def _regularised(k_ss: jax.Array, reg: float) -> jax.Array:
    """K_ss + ridge I, with a gradient that adds a multiple of I rather than masking an n x n array.

    With G the cotangent: dK = G + (reg / n) tr(G) I and d reg = tr(G) tr(K_ss) / n. Autodiff of
    `k_ss + ridge * eye` gets the same numbers, but sums G's diagonal by masking all of G, which
    XLA:CPU materialises; together with the forward pass's trace that was 17 ms of a 3000 x 5000
    KIP step (docs/scaling.md)."""
    return _regularised_forward(k_ss, reg)[0]


def _regularised_forward(k_ss, reg):
    n = k_ss.shape[0]
    trace = _trace(k_ss)
    return k_ss + (reg * trace / n) * jnp.eye(n, dtype=k_ss.dtype), (trace, reg)


def _regularised_backward(residuals, cotangent):
    trace, reg = residuals
    n = cotangent.shape[0]
    cotangent_trace = _trace(cotangent)
    d_k = cotangent + (reg * cotangent_trace / n) * jnp.eye(n, dtype=cotangent.dtype)
    return d_k, cotangent_trace * trace / n


_regularised.defvjp(_regularised_forward, _regularised_backward)


def fit(k_ss: jax.Array, y_s: jax.Array, reg: float) -> jax.Array:
    """Dual coefficients alpha = (K_ss + ridge I)^-1 y_s, by Cholesky (K_ss is PSD).

    Differentiable in K_ss and y_s (`_solve_pos`): the gradient with respect to K_ss comes out
    symmetric (up to rounding), so a caller that computes K_ss from one set of images can skip symmetrising it
    (`kernels.self_kernel(..., symmetric_use=True)`). Reverse mode only (jax.grad, jax.vjp): the
    hand-written gradient has no forward-mode rule, and nothing here needs one.
    """
    runtime.limit_lapack_threads()  # once per process: see pipeline/run/runtime.py for why
    dtype = jnp.result_type(k_ss, y_s)  # as jax's solve promotes: one dtype for the factor and both sides
    k_ss, y_s = jnp.asarray(k_ss, dtype), jnp.asarray(y_s, dtype)
    return _solve_pos(_regularised(k_ss, reg), y_s)


@jax.custom_vjp
def _solve_pos(k_reg: jax.Array, y: jax.Array) -> jax.Array:
    """k_reg^-1 y for a symmetric positive-definite k_reg, with a hand-written gradient.

    Differentiating through the Cholesky factorisation would cost O(n^3) again (45 ms against
    8 ms for a 1000-image support); the gradient needs only one more pair of triangular solves,
    lambda = k_reg^-1 g. The Cholesky reads one triangle, so only the symmetric part of the
    matrix's gradient is defined: we return -(lambda alpha^T + alpha lambda^T) / 2, as one thin
    matmul [lambda alpha] [alpha lambda]^T, so the kernel's backward pass reads one n x n array
    rather than two (symmetric up to rounding: entry (i, j) adds the same products as (j, i), in
    another order). Autodiff's -lambda alpha^T would leave the symmetrising to the caller, and on
    XLA:CPU a transposed add over n x n entries, fused into the kernel's backward pass, cost more
    than the kernel's own element-wise work (3000 support: docs/scaling.md).
    """
    return _solve_pos_forward(k_reg, y)[0]


def _solve_pos_forward(k_reg: jax.Array, y: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    factor = cholesky(k_reg, lower=True)
    alpha = cho_solve((factor, True), y)
    return alpha, (factor, alpha)


def _solve_pos_backward(residuals, cotangent):
    factor, alpha = residuals
    lam = cho_solve((factor, True), cotangent)
    columns_lam, columns_alpha = lam.reshape(len(lam), -1), alpha.reshape(len(alpha), -1)  # y may be one vector
    left = jnp.concatenate([columns_lam, columns_alpha], axis=1)
    right = jnp.concatenate([columns_alpha, columns_lam], axis=1)
    return -0.5 * (left @ right.T), lam


_solve_pos.defvjp(_solve_pos_forward, _solve_pos_backward)


def predict(k_ts: jax.Array, alpha: jax.Array) -> jax.Array:
    return k_ts @ alpha


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max matches the integer label."""
    return float(np.mean(np.argmax(np.asarray(predictions), axis=1) == np.asarray(labels)))


def mse(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Mean over rows of the summed squared error (the paper's test MSE)."""
    diff = np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)
    return float(np.mean(np.sum(diff * diff, axis=1)))


def centered_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot minus 1/C: the zero-mean regression targets of the KIP paper."""
    eye = np.eye(num_classes, dtype=np.float32)
    return eye[np.asarray(labels)] - np.float32(1.0 / num_classes)


def label_solve(k_ss: jax.Array, k_ts: jax.Array, y_t: jax.Array, reg: float) -> jax.Array:
    """Support labels that minimise |y_t - K_ts (K_ss + ridge I)^-1 y_s|^2 for a fixed support.

    With z = (K_ss + ridge I)^-1 y_s the loss is a least-squares problem in z, so
    z* = (K_st K_ts + ridge' I)^-1 K_st y_t and y_s* = (K_ss + ridge I) z*  (KIP paper, Sec. 3).
    """
    return label_solve_from_moments(k_ss, k_ts.T @ k_ts, k_ts.T @ y_t, reg)


def label_solve_from_moments(k_ss: jax.Array, gram: jax.Array, rhs: jax.Array, reg: float) -> jax.Array:
    """Label Solve given K_st K_ts and K_st y_t, which can be summed block by block over targets."""
    runtime.limit_lapack_threads()
    n = k_ss.shape[0]
    eye = jnp.eye(n, dtype=k_ss.dtype)
    z = cho_solve(cho_factor(gram + ridge(gram, reg) * eye, lower=True), rhs)
    return (k_ss + ridge(k_ss, reg) * eye) @ z
