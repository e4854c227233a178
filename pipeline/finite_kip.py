"""KIP against the kernels of finite networks: a support that suits width-`w` networks, not only
the infinite-width kernel.

Why: a width-1024 FC network trained with centred MSE converges, in the kernel regime, to kernel
regression with its *own* empirical NTK at initialisation (pipeline/network_kernel.py). KIP's
learned labels are tuned to the infinite-width kernel, which differs from each network's by
O(1/sqrt(width)); on the paper matrix's MNIST 100-image learned-label support that costs 16 points
(97.2 % with the infinite kernel, 81.5 % with a network's own, on validation), and re-solving the
labels for each network stops at about 92.6 % (benchmarks/transfer_solved_labels.py --ceiling).

So this runs KIP with the kernel of a *freshly initialised* network at every step, over (image,
output) pairs as that network sees them:

    loss = 0.5 * mean((y_t - Θ_ts (Θ_ss + ridge I)^-1 y_s)^2),   Θ = Θ_params(step)

Images and labels are both learned (Adam), starting from a given support (typically a KIP
support). Averaging over initialisations makes the support good for the *distribution* of
networks, so it transfers to inits it never saw. Progress is monitored on the validation split
with the kernel of one more init that training never draws (the step with the best validation
accuracy is kept); the test split is never read here.

Kept apart from `kip` because the kernel is not a function of two images (it is a 10×10 block per
image pair, and random per step), so KIP's loss, blocking and checkpoints do not apply as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from pipeline import kip, krr, network_kernel, runtime
from pipeline.config import TrainConfig
from pipeline.errors import UserError


@dataclasses.dataclass(frozen=True)
class FiniteKipConfig:
    """steps, learning rate (Adam, images and labels alike) and target batch of the finite-width
    KIP loop; `reg` is the ridge relative to Θ_ss's mean diagonal (float32 needs more than the
    infinite-kernel KIP's 1e-6); validation is scored every `eval_every` steps."""

    steps: int = 1500
    learning_rate: float = 0.02
    target_batch: int = 1000
    reg: float = 1e-5
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "target_batch", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"finite_kip.{name} must be a positive integer (got {value!r})")
        for name in ("learning_rate", "reg"):
            value = getattr(self, name)
            if not value > 0:
                raise UserError(f"finite_kip.{name} must be positive (got {value!r})")


class FiniteKipResult(NamedTuple):
    images: np.ndarray  # the support at the best validation step (float32)
    labels: np.ndarray
    best_step: int
    history: list[dict[str, float]]  # {"step", "loss"} every step; "val_accuracy" every eval_every


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
    centred MSE, predicts for x in the kernel regime (ridge `reg` for float32 stability)."""
    runtime.limit_lapack_threads()  # as krr's solves: one LAPACK thread (pipeline/runtime.py says why)
    k_ss = kernel_matrix(network, params, x_s, x_s)
    k_ss = k_ss + reg * jnp.trace(k_ss) / k_ss.shape[0] * jnp.eye(k_ss.shape[0], dtype=k_ss.dtype)
    alpha = cho_solve(cho_factor(k_ss, lower=True), y_s.reshape(-1))
    return (kernel_matrix(network, params, x, x_s) @ alpha).reshape(x.shape[0], y_s.shape[1])


def distill(images: np.ndarray, labels: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
            x_val: np.ndarray, y_val: np.ndarray, num_classes: int, network: TrainConfig,
            config: FiniteKipConfig, *, progress: bool = True) -> FiniteKipResult:
    """Fine-tune the support (images, labels) against freshly initialised `network`s' kernels;
    returns the support with the best validation accuracy (monitor network's kernel regression)."""
    from tqdm.auto import tqdm

    from pipeline import finite

    if len(y_val) == 0:
        raise UserError("finite-width KIP keeps the step that does best on validation; set data.validation_fraction > 0")
    shape = images.shape[1:]

    def init(stream: int, index: int) -> Any:
        return finite._init(network, shape, num_classes, int(np.random.default_rng([config.seed, stream, index]).integers(2**31)))[1]

    def loss_fn(support, params, x_t, y_t):
        return 0.5 * jnp.mean((predict(network, params, support[0], support[1], x_t, config.reg) - y_t) ** 2)

    step_fn = jax.jit(jax.value_and_grad(loss_fn))
    monitor_params = init(5, 0)  # never drawn for training (stream 6)
    score = jax.jit(lambda support, x: predict(network, monitor_params, support[0], support[1], x, config.reg))

    def val_accuracy(support) -> float:
        correct = sum(int(np.sum(np.asarray(score(support, jnp.asarray(x_val[i:i + 1000]))).argmax(1) == y_val[i:i + 1000]))
                      for i in range(0, len(y_val), 1000))
        return correct / len(y_val)

    optimizer = optax.adam(config.learning_rate)
    support = (jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.float32))
    state = optimizer.init(support)
    best = (val_accuracy(support), 0, support)
    history: list[dict[str, float]] = [{"step": 0, "val_accuracy": best[0]}]
    for step in tqdm(range(1, config.steps + 1), desc="finite-width KIP", disable=not progress, mininterval=0.5):
        idx = kip.target_indices(y_train, num_classes, config.target_batch, config.seed, step)
        y_t = jnp.asarray(krr.centered_one_hot(y_train[idx], num_classes))
        loss, grads = step_fn(support, init(6, step), jnp.asarray(x_train[idx]), y_t)
        if not np.isfinite(float(loss)):
            raise UserError(f"finite-width KIP diverged at step {step}; lower finite_kip.learning_rate "
                            f"(now {config.learning_rate}) or raise finite_kip.reg (now {config.reg})")
        updates, state = optimizer.update(grads, state, support)
        support = optax.apply_updates(support, updates)
        point: dict[str, float] = {"step": step, "loss": float(loss)}
        if step % config.eval_every == 0 or step == config.steps:
            point["val_accuracy"] = val_accuracy(support)
            if point["val_accuracy"] > best[0]:
                best = (point["val_accuracy"], step, support)
        history.append(point)
    images_out, labels_out = (np.asarray(a, np.float32) for a in best[2])
    if not (np.isfinite(images_out).all() and np.isfinite(labels_out).all()):
        raise UserError("finite-width KIP produced a non-finite support; expected finite images and labels")
    return FiniteKipResult(images_out, labels_out, best[1], history)
