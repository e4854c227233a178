"""The empirical NTK of freshly initialised finite FC networks, as a KIP kernel (`kip.KipKernel`).

Why: a width-1024 FC network trained with centred MSE converges, in the kernel regime, to kernel
regression with its *own* empirical NTK at initialisation (`network_kernel`). KIP's learned labels
are tuned to the infinite-width kernel, which differs from each network's by O(1/sqrt(width)); on
the paper matrix's MNIST 100-image learned-label support that costs 16 points (97.2 % with the
infinite kernel, 81.5 % with a network's own, on validation), and re-solving the labels for each
network stops at about 92.6 % (benchmarks/transfer_solved_labels.py --ceiling).

So KIP can run with the kernel of a *freshly initialised* network at every step, over (image,
output) pairs as that network sees them:

    loss = 0.5 * mean((y_t - Θ_ts (Θ_ss + ridge I)^-1 y_s)^2),   Θ = Θ_params(step)

Averaging over initialisations makes the support good for the *distribution* of networks, so it
transfers to inits it never saw. Progress is monitored on validation with the kernel of one more
init that training never draws.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.distill import krr
from pipeline.evaluate import finite
from pipeline.kernels import network_kernel
from pipeline.run.config import TrainConfig

_TRAIN_STREAM, _MONITOR_STREAM = 6, 5  # the monitor's init is never drawn for training


def kernel_matrix(network: TrainConfig, params: Any, x1: jax.Array, x2: jax.Array) -> jax.Array:
    """Θ(x1, x2) of the network at `params`, (n1 * outputs, n2 * outputs), float32, differentiable
    in the images: network_kernel's closed form, reshaped for a solve."""
    network_kernel.check_supported(network)
    a1, d1 = network_kernel._activations_and_signals(network, params, x1)
    a2, d2 = network_kernel._activations_and_signals(network, params, x2)
    scales = tuple(network_kernel._scales(network, inp.shape[-1]) for inp in a1)
    full = network_kernel._full_float32(tuple(a1), tuple(d1), tuple(a2), tuple(d2), scales)
    return full.reshape(full.shape[0] * full.shape[1], -1)


def predict(network: TrainConfig, params: Any, x_s: jax.Array, y_s: jax.Array, x: jax.Array, reg: float) -> jax.Array:
    """Kernel regression with the network's own NTK: what that network, trained on (x_s, y_s) with
    centred MSE, predicts for x in the kernel regime (`krr.fit`'s ridge, relative to the mean diagonal)."""
    alpha = krr.fit(kernel_matrix(network, params, x_s, x_s), y_s.reshape(-1, 1), reg)
    return (kernel_matrix(network, params, x, x_s) @ alpha).reshape(x.shape[0], y_s.shape[1])


class FiniteNetworkKernel:
    """A fresh `network` (seeded from (seed, step)) per KIP step; its empirical NTK is the kernel."""

    refusals = {
        "distill.float64": "the networks' kernel is computed in float32 (network_kernel._full_float32); expected float64: false",
        "several processes": "the kernel of (image, output) pairs is not split across devices; run it as one process",
    }

    def __init__(self, network: TrainConfig, image_shape: tuple[int, ...], num_classes: int, seed: int):
        network_kernel.check_supported(network)
        self.network, self.image_shape, self.num_classes, self.seed = network, tuple(image_shape), num_classes, seed
        self.settings = {"name": "the empirical NTK of finite networks", "network": dict(network.__dict__), "seed": seed}

    def params(self, stream: int, index: int) -> Any:
        seed = int(np.random.default_rng([self.seed, stream, index]).integers(2**31))
        return finite._init(self.network, self.image_shape, self.num_classes, seed)[1]

    def draw(self, step: int) -> Any:
        return self.params(_TRAIN_STREAM, step)

    def fit(self, params: Any, images: jax.Array, labels: jax.Array, reg: float):
        alpha = krr.fit(kernel_matrix(self.network, params, images, images), labels.reshape(-1, 1), reg)
        return images, alpha, labels.shape[1]

    def predict(self, params: Any, fitted, x: jax.Array) -> jax.Array:
        images, alpha, outputs = fitted
        return (kernel_matrix(self.network, params, x, images) @ alpha).reshape(x.shape[0], outputs)

    def monitor(self, x_val: np.ndarray, y_val: np.ndarray, reg: float, block: int = 1000):
        """Validation accuracy of kernel regression with the monitor network's kernel."""
        params = self.params(_MONITOR_STREAM, 0)
        score = jax.jit(lambda images, labels, x: predict(self.network, params, images, labels, x, reg))

        def monitor(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            correct = sum(int(np.sum(np.asarray(score(jnp.asarray(images), jnp.asarray(labels),
                                                      jnp.asarray(x_val[i:i + block]))).argmax(1) == y_val[i:i + block]))
                          for i in range(0, len(y_val), block))
            return {"val_accuracy": correct / len(y_val)}

        return monitor
