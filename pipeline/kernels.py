"""Kernel specs -> kernel functions.

`make(spec)` returns `kernel(x1, x2) -> (n1, n2)` for images of any shape: a pure, jittable,
differentiable JAX function. Network kernels are the infinite-width NNGP / NTK of neural-tangents
`stax` networks (Novak et al. 2020), so the formulas are the library's, not ours; RBF is one line.

`kernel_matrix` evaluates a kernel in fixed-size blocks so that a 10,000 x 1,000 (or 60,000 x 100)
matrix never holds more than one block of intermediates in memory, and the block shape never
changes (one compilation).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.config import KernelConfig

KernelFn = Callable[[jax.Array, jax.Array], jax.Array]

with warnings.catch_warnings():
    # neural-tangents 0.6.5 touches jax.core names that jax 0.5.3 deprecates; harmless on our pin.
    warnings.filterwarnings("ignore", message=r"jax\.core\..* is deprecated", category=DeprecationWarning)
    from neural_tangents import stax


def stax_network(spec: KernelConfig, width: int = 1):
    """The (init_fn, apply_fn, kernel_fn) triple of the network behind a kernel spec.

    `width` only matters for the finite network (Monte-Carlo checks, transfer); the infinite-width
    kernel does not depend on it.
    """
    if spec.architecture == "rbf":
        raise ValueError("the rbf kernel has no network")
    activation = stax.Relu() if spec.activation == "relu" else stax.Erf()
    common = dict(W_std=spec.w_std, b_std=spec.b_std, parameterization=spec.parameterization)
    layers = []
    if spec.architecture == "fc":
        layers.append(stax.Flatten())
        for _ in range(spec.depth):
            layers += [stax.Dense(width, **common), activation]
        layers.append(stax.Dense(1, **common))
    else:
        for _ in range(spec.depth):
            layers += [stax.Conv(width, (3, 3), padding="SAME", **common), activation]
        layers.append(stax.Flatten() if spec.conv_readout == "flatten" else stax.GlobalAvgPool())
        layers.append(stax.Dense(1, **common))
    return stax.serial(*layers)


def make(spec: KernelConfig) -> KernelFn:
    """A kernel function k(x1, x2) -> (n1, n2) for the spec (NTK or NNGP of the network, or RBF)."""
    if spec.architecture == "rbf":
        gamma = spec.gamma

        def rbf(x1: jax.Array, x2: jax.Array) -> jax.Array:
            a = x1.reshape(x1.shape[0], -1)
            b = x2.reshape(x2.shape[0], -1)
            sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
            return jnp.exp(-gamma * jnp.maximum(sq, 0.0) / a.shape[1])

        return rbf

    _, _, kernel_fn = stax_network(spec)
    kind = spec.kind

    def network_kernel(x1: jax.Array, x2: jax.Array) -> jax.Array:
        return kernel_fn(x1, x2, kind)

    return network_kernel


def kernel_matrix(
    kernel_fn: KernelFn, x1: np.ndarray, x2: np.ndarray, block_size: int = 1000
) -> np.ndarray:
    """k(x1, x2) as a NumPy array, computed in (block_size x block_size) tiles.

    Peak memory is one tile's intermediates plus the (n1, n2) result; tiles are padded to a fixed
    shape so the jitted kernel compiles once.
    """
    x1 = np.asarray(x1)
    x2 = np.asarray(x2)
    dtype = np.result_type(x1.dtype, x2.dtype)
    out = np.empty((len(x1), len(x2)), dtype=dtype)
    rows = min(block_size, len(x1))
    cols = min(block_size, len(x2))
    tile = _jitted(kernel_fn)
    for i in range(0, len(x1), rows):
        a = _pad_to(x1[i : i + rows], rows)
        for j in range(0, len(x2), cols):
            b = _pad_to(x2[j : j + cols], cols)
            block = np.asarray(tile(a, b))
            n_i = min(rows, len(x1) - i)
            n_j = min(cols, len(x2) - j)
            out[i : i + n_i, j : j + n_j] = block[:n_i, :n_j]
    return out


_JIT_CACHE: "weakref.WeakKeyDictionary[KernelFn, Callable]" = weakref.WeakKeyDictionary()


def _jitted(kernel_fn: KernelFn) -> Callable:
    """One jitted wrapper per kernel function, so repeated calls reuse its compilations."""
    if kernel_fn not in _JIT_CACHE:
        _JIT_CACHE[kernel_fn] = jax.jit(kernel_fn)
    return _JIT_CACHE[kernel_fn]


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    """Pad with copies of the first row: keeps padded rows finite for every kernel."""
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])
