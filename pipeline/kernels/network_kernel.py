"""The empirical NTK of one of our finite FC networks at its initial parameters, and the support
labels solved for it ("network Label Solve").

Why: KIP's learned labels are tuned to the infinite-width kernel. A width-1024 network trained with
centred MSE is, in the kernel regime, kernel regression with *its own* empirical NTK, which differs
from the infinite one by O(1/sqrt(width)); on the matrix's 100 MNIST images with learned labels,
kernel regression with that kernel scores 81.5 % on validation against 97.2 % with the infinite one
(benchmarks/transfer_solved_labels.py --diagnose; docs/reproduction.md). Solving the
support's labels for the network's own kernel (the paper's Label Solve, Sec. 3, with the network's
kernel in place of the infinite one) keeps KIP's images and re-fits the labels to the network that
will train on them, using only training images.

The kernel is computed in closed form from one forward pass per image batch: for a dense layer
z = c * a W + s * b, the gradient of output k with respect to (W, b) is (c a ⊗ δ_k, s δ_k), so the
layer adds (δ_k(x)·δ_k'(x')) (c² a(x)·a(x') + s²) to Θ_kk'(x, x'). The kernel is over (image,
output) pairs: at finite width the outputs share hidden units, so Θ_kk' ≠ 0 for k ≠ k', and
dropping those terms (averaging Θ_kk over outputs, as kernels usually are) gave labels that trained
networks about 1 point worse in one exploratory run (docs/reproduction.md). tests/test_network_kernel.py holds it to
neural-tangents' autodiff `empirical_ntk_fn` on the same parameters.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from pipeline.compat import enable_x64

from pipeline.distill import krr
from pipeline.errors import UserError
from pipeline.run.config import TrainConfig


def empirical_ntk(config: TrainConfig, params: Any, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Θ(x1, x2) of the FC network `config` at `params` (flax's tree): (n1, n2, outputs, outputs),
    float64, as neural-tangents' `empirical_ntk_fn(..., trace_axes=())` lays it out."""
    check_supported(config)
    a1, d1 = _activations_and_signals(config, params, jnp.asarray(x1, jnp.float32))
    a2, d2 = _activations_and_signals(config, params, jnp.asarray(x2, jnp.float32))
    return _full(config, a1, d1, a2, d2).transpose(0, 2, 1, 3)


def check_supported(config: TrainConfig) -> None:
    if config.architecture != "fc":
        raise UserError(f"train.labels=solved needs train.architecture=fc (got {config.architecture!r}); "
                        "expected fc, or train.labels=support")


def solve_labels(config: TrainConfig, params: Any, support: np.ndarray, targets: np.ndarray,
                 target_classes: np.ndarray, num_classes: int, reg: float, block: int = 500) -> np.ndarray:
    """Support labels Y_s minimising |Y_t - Θ_ts (Θ_ss + ridge I)^-1 Y_s|^2 over the target images, with
    Θ the network's own empirical NTK over (image, output) pairs, and Y_t the centred one-hot classes
    (the KIP paper's targets). Centred MSE training in the kernel regime converges to exactly that
    kernel regression, so these are the labels this network predicts the training data best from.
    The sums over targets are accumulated block by block, as `kip.label_solve` does."""
    check_supported(config)
    a_s, d_s = _activations_and_signals(config, params, jnp.asarray(support, jnp.float32))
    size = len(support) * num_classes
    k_ss = _full(config, a_s, d_s, a_s, d_s).reshape(size, size)
    y_t = np.asarray(krr.centered_one_hot(target_classes, num_classes), np.float64)
    gram = np.zeros((size, size))
    rhs = np.zeros((size, 1))
    for start in range(0, len(targets), block):
        a_t, d_t = _activations_and_signals(config, params, jnp.asarray(targets[start:start + block], jnp.float32))
        k_ts = _full(config, a_t, d_t, a_s, d_s).reshape(-1, size)
        gram += k_ts.T @ k_ts
        rhs += k_ts.T @ y_t[start:start + block].reshape(-1, 1)
    with enable_x64():
        labels = np.asarray(krr.label_solve_from_moments(jnp.asarray(k_ss), jnp.asarray(gram), jnp.asarray(rhs), reg))
    if not np.isfinite(labels).all():
        raise UserError(f"network Label Solve gave non-finite labels for a {len(support)}-image support; "
                        "expected a non-singular kernel (raise train.solve_reg)")
    return labels.reshape(len(support), num_classes).astype(np.float32)


def _scales(config: TrainConfig, fan_in: int) -> tuple[float, float]:
    """(c², s²): the squared factors on a W and on b, per parameterisation (finite.ScaledDense)."""
    if config.parameterization == "ntk":
        return config.w_std ** 2 / fan_in, config.b_std ** 2
    return 1.0, 1.0


@jax.jit
def _relu_grad(z: jax.Array) -> jax.Array:
    return (z > 0).astype(z.dtype)


def _activations_and_signals(config: TrainConfig, params: Any, x: jax.Array) -> tuple[list, list]:
    """Per dense layer: its input a (n, fan_in) and the backward signals δ (n, outputs, width) of
    every network output with respect to the layer's pre-activation."""
    tree = params["params"]
    layers = [tree[f"ScaledDense_{i}"] for i in range(config.depth + 1)]
    a = x.reshape(x.shape[0], -1)
    inputs, pre = [], []
    for layer in layers:
        fan_in = a.shape[-1]
        c = config.w_std / math.sqrt(fan_in) if config.parameterization == "ntk" else 1.0
        s = config.b_std if config.parameterization == "ntk" else 1.0
        z = c * a @ layer["kernel"] + s * layer["bias"]
        inputs.append(a)
        pre.append(z)
        a = jax.nn.relu(z)
    outputs = pre[-1].shape[-1]
    signal = jnp.broadcast_to(jnp.eye(outputs, dtype=x.dtype), (x.shape[0], outputs, outputs))
    signals = [signal]
    for index in range(len(layers) - 1, 0, -1):  # back through the hidden layers
        fan_in = inputs[index].shape[-1]
        c = config.w_std / math.sqrt(fan_in) if config.parameterization == "ntk" else 1.0
        signal = c * jnp.einsum("nkj,ij->nki", signal, layers[index]["kernel"]) * _relu_grad(pre[index - 1])[:, None, :]
        signals.insert(0, signal)
    return inputs, signals


def _full(config: TrainConfig, a1: list, d1: list, a2: list, d2: list) -> np.ndarray:
    """Θ over (image, output) pairs, laid out (n1, outputs, n2, outputs), float64: per layer the
    signals' inner products (one matmul over the layer's width) times c² a·a' + s².

    Computed in float32 in one compiled function and widened at the end: the signal matmul already
    rounds to float32 (relative error ~ sqrt(width) * 6e-8), and the product and layer sum add one
    rounding more, while the float64 elementwise work it replaces took ~70 % of a 500-image label
    solve. Only the sums over targets (`solve_labels`' gram) need float64, as they square Θ's condition."""
    scales = tuple(_scales(config, inp.shape[-1]) for inp in a1)
    return np.asarray(_full_float32(tuple(a1), tuple(d1), tuple(a2), tuple(d2), scales), np.float64)


@functools.partial(jax.jit, static_argnums=4)
def _full_float32(a1: tuple, d1: tuple, a2: tuple, d2: tuple, scales: tuple) -> jax.Array:
    n1, outputs, n2 = a1[0].shape[0], d1[-1].shape[1], a2[0].shape[0]
    total = jnp.zeros((n1, outputs, n2, outputs), jnp.float32)
    for inp1, sig1, inp2, sig2, (c2, s2) in zip(a1, d1, a2, d2, scales):
        signal = sig1.reshape(n1 * outputs, -1) @ sig2.reshape(n2 * outputs, -1).T
        inputs = c2 * (inp1 @ inp2.T) + s2
        total = total + signal.reshape(n1, outputs, n2, outputs) * inputs[:, None, :, None]
    return total
