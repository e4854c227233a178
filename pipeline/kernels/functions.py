"""Kernel specs -> kernel functions.

`make(spec)` returns `kernel(x1, x2) -> (n1, n2)` for images of any shape: a pure, jittable,
differentiable JAX function. Network kernels are the infinite-width NNGP / NTK of neural-tangents
`stax` networks (Novak et al. 2020). For FC networks and RBF we evaluate the same recursion in
closed form from one Gram matrix (`closed_form`: faster KIP steps, held to neural-tangents by
tests/test_closed_form.py); ConvNet kernels are neural-tangents' own (`make_reference`), and
conv_rf is their random-feature estimate (`conv_features.EvaluationKernel`).

`self_kernel(kernel, x)` is k(x, x) with its diagonal pinned exact where the kernel allows.

`kernel_rows` evaluates a kernel against a support set in fixed-size row blocks, so a 60,000-image
evaluation never holds more than one block of kernel and intermediates in memory; the block
shape never changes (one compilation).
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.errors import UserError
from pipeline.kernels import closed_form
from pipeline.run import devices
from pipeline.run.config import KernelConfig

KernelFn = Callable[[jax.Array, jax.Array], jax.Array]

def _stax():
    """neural-tangents' `stax`, imported on first use: it imports TensorFlow (4 s, ~670 MB), which
    FC and RBF kernels (our closed forms) never need."""
    with warnings.catch_warnings():
        # neural-tangents 0.6.5 touches jax.core names that jax 0.5.3 deprecates; harmless on our pin.
        warnings.filterwarnings("ignore", message=r"jax\.core\..* is deprecated", category=DeprecationWarning)
        try:
            from neural_tangents import stax
        except ModuleNotFoundError:
            raise UserError("kernel.architecture=conv (the exact ConvNet kernel) needs neural-tangents, which this "
                            "install lacks: pip install -c constraints.txt -e '.[full,exact]' (it pins jax 0.5.3), or "
                            "use kernel.architecture=conv_rf, the random-feature ConvNet kernel") from None
    return stax


def stax_network(spec: KernelConfig, width: int = 1):
    """The (init_fn, apply_fn, kernel_fn) triple of the network behind a kernel spec.

    `width` only matters for the finite network (Monte-Carlo checks, transfer); the infinite-width
    kernel does not depend on it.
    """
    if spec.architecture in ("rbf", "conv_rf"):
        raise ValueError(f"kernel.architecture={spec.architecture} has no neural-tangents network here")
    stax = _stax()
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


class GramKernelFn:
    """k(x1, x2) for kernels that see inputs only through dot products (FC networks, RBF)."""

    def __init__(self, spec: KernelConfig):
        self.spec = spec

    def from_gram(self, gram: jax.Array, sq1: jax.Array, sq2: jax.Array, input_dim: int, same: bool = False):
        return closed_form.gram_kernel(self.spec, input_dim)(gram, sq1, sq2, same=same)

    def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
        if x1 is x2:
            return self_kernel(self, x1)
        gram, sq1, sq2 = closed_form.flat_gram(x1, x2)
        return self.from_gram(gram, sq1, sq2, _input_dim(x1))


def make(spec: KernelConfig) -> KernelFn:
    """A kernel function k(x1, x2) -> (n1, n2) for the spec (NTK or NNGP of the network, or RBF;
    for conv_rf, the estimate under one fixed draw of random ConvNets)."""
    if closed_form.supports(spec):
        return GramKernelFn(spec)
    if spec.architecture == "conv_rf":
        from pipeline.kernels import conv_features

        return conv_features.EvaluationKernel(spec)
    return make_reference(spec)


def make_reference(spec: KernelConfig) -> KernelFn:
    """The kernel as neural-tangents computes it: the reference our closed forms are held to."""
    if spec.architecture == "rbf":
        return GramKernelFn(spec)  # RBF has no network; its closed form is the definition
    if spec.architecture == "conv_rf":
        raise ValueError("conv_rf estimates a kernel; its reference is kernels.exact_conv_kernel_fn")
    _, _, kernel_fn = stax_network(spec)
    kind = spec.kind

    def network_kernel(x1: jax.Array, x2: jax.Array) -> jax.Array:
        return kernel_fn(x1, x2, kind)

    return network_kernel


def self_kernel(kernel_fn: KernelFn, x: jax.Array, *, symmetric_use: bool = False) -> jax.Array:
    """k(x, x). Gram kernels are told the pairs on the diagonal are identical, which keeps K_ss's
    diagonal exact in float32 (see `closed_form._relu`), and their backward pass is one matmul
    (`_gram_self_kernel`).

    symmetric_use: the caller promises that every cotangent reaching k is symmetric, as
    `krr.fit`'s is. Gram kernels then skip symmetrising it, an n x n transposed add that XLA:CPU
    fuses into the kernel map's backward pass with strided reads (3000 support: docs/scaling.md).
    Under an asymmetric cotangent the gradient would be wrong (the Gram's backward pass is 2 G x,
    which is (G + G^T) x only for a symmetric G).
    """
    if isinstance(kernel_fn, GramKernelFn):
        if symmetric_use:
            return _gram_self_kernel_value(kernel_fn, x)
        return _gram_self_kernel(kernel_fn, x)
    return kernel_fn(x, x)


def _gram_self_kernel_value(kernel_fn: "GramKernelFn", x: jax.Array) -> jax.Array:
    gram, sq = closed_form.self_gram(x)
    return kernel_fn.from_gram(gram, sq, sq, _input_dim(x), same=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gram_self_kernel(kernel_fn: "GramKernelFn", x: jax.Array) -> jax.Array:
    """K_ss with its cotangent symmetrised before the backward pass.

    K_ss is symmetric, so sum(C * K_ss) = sum(((C + C^T) / 2) * K_ss) for any cotangent C: the
    gradient is the same. With a symmetric cotangent, the Gram matrix's is symmetric too, and its
    backward pass takes one n x n x d matmul instead of two (`closed_form.self_gram`).
    """
    return _gram_self_kernel_value(kernel_fn, x)


def _gram_self_kernel_forward(kernel_fn, x):
    return jax.vjp(functools.partial(_gram_self_kernel_value, kernel_fn), x)


def _gram_self_kernel_backward(kernel_fn, vjp, cotangent):
    return vjp(0.5 * (cotangent + cotangent.T))


_gram_self_kernel.defvjp(_gram_self_kernel_forward, _gram_self_kernel_backward)


def _input_dim(x: jax.Array) -> int:
    return int(np.prod(x.shape[1:]))


def support_matrix(kernel_fn: KernelFn, support: np.ndarray) -> np.ndarray:
    """k(support, support) as a NumPy array, in one piece (supports are small)."""
    if _has_features(kernel_fn):
        features = kernel_fn.feature_rows(support)
        return features @ features.T + np.float32(kernel_fn.offset)
    return devices.to_host(_jitted_self(kernel_fn)(devices.put_replicated(np.asarray(support))))


def _has_features(kernel_fn: KernelFn) -> bool:
    """Kernels given as an explicit feature map (conv_rf's `EvaluationKernel`): k = f(x1) . f(x2) +
    offset, with f of each array computed (and kept) once, rather than per pair of blocks."""
    return callable(getattr(kernel_fn, "feature_rows", None))


def kernel_matrix(kernel_fn: KernelFn, x1: np.ndarray, x2: np.ndarray, block_size: int = 1000) -> np.ndarray:
    """k(x1, x2) as a NumPy array, computed `block_size` rows of x1 at a time (x2 is a support set)."""
    out = np.empty((len(x1), len(x2)), dtype=np.result_type(np.asarray(x1).dtype, np.asarray(x2).dtype))
    for rows, block in kernel_rows(kernel_fn, x1, x2, block_size):
        out[rows] = block
    return out


def kernel_rows(
    kernel_fn: KernelFn, x: np.ndarray, support: np.ndarray, block_size: int = 1000
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (rows, k(x[rows], support)) block by block.

    Memory is one block's kernel and intermediates whatever len(x) is, if the caller reduces each
    block (predictions, sums) and drops it. Blocks are padded to one shape (one compilation) and
    split by rows across all devices (`devices`).
    """
    x = np.asarray(x)
    if _has_features(kernel_fn):
        features, support_features = kernel_fn.feature_rows(x), kernel_fn.feature_rows(support)
        for start in range(0, len(x), block_size):
            rows = slice(start, min(start + block_size, len(x)))
            yield rows, features[rows] @ support_features.T + np.float32(kernel_fn.offset)
        return
    rows = devices.padded_rows(min(block_size, len(x)))
    on_devices = devices.put_replicated(np.asarray(support))
    tile = _jitted(kernel_fn)
    for start in range(0, len(x), rows):
        n = min(rows, len(x) - start)
        block = devices.put_rows(_pad_to(x[start:start + rows], rows))
        yield slice(start, start + n), devices.to_host(tile(block, on_devices))[:n]


_JIT_CACHE: "weakref.WeakKeyDictionary[KernelFn, Callable]" = weakref.WeakKeyDictionary()


def _jitted(kernel_fn: KernelFn) -> Callable:
    """One jitted tile function per kernel function, so repeated calls reuse its compilations."""
    if kernel_fn not in _JIT_CACHE:
        _JIT_CACHE[kernel_fn] = jax.jit(lambda a, b: devices.shard_rows(kernel_fn(a, b)))
    return _JIT_CACHE[kernel_fn]


_SELF_JIT_CACHE: "weakref.WeakKeyDictionary[KernelFn, Callable]" = weakref.WeakKeyDictionary()


def _jitted_self(kernel_fn: KernelFn) -> Callable:
    if kernel_fn not in _SELF_JIT_CACHE:
        _SELF_JIT_CACHE[kernel_fn] = jax.jit(lambda x: self_kernel(kernel_fn, x))
    return _SELF_JIT_CACHE[kernel_fn]


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    """Pad with copies of the first row: keeps padded rows finite for every kernel."""
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])


def exact_conv_kernel_fn(config):
    """neural-tangents' exact NNGP of the infinite-width ConvNet a `conv_features.ConvFeatureConfig`
    estimates (a readout layer added): the reference the random-feature estimate is held to. Hours
    per KIP step on MNIST-sized images; small images only."""
    stax = _stax()
    layers = []
    for _ in range(config.depth):
        layers += [stax.Conv(1, (3, 3), padding="SAME", W_std=config.w_std, b_std=config.b_std,
                             parameterization="ntk"), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2))]
    layers += [stax.Flatten(), stax.Dense(1, W_std=config.w_std, b_std=config.b_std, parameterization="ntk")]
    _, _, kernel_fn = stax.serial(*layers)
    return lambda x1, x2: kernel_fn(x1, x2, "nngp")
