"""Finite-width networks (Flax linen + optax) trained on a support set: the paper's transfer test.

Two families, mirroring the kernels: a fully-connected ReLU net and a small ConvNet (3x3 conv, ReLU,
2x2 pooling per block, dense readout, as in the KIP follow-up's transfer code). Under the ntk
parameterisation every layer computes (w_std / sqrt(fan_in)) * x @ W + b_std * b with W, b ~ N(0, 1):
the parameterisation whose infinite-width limit is the kernel KIP distilled against. `standard`
draws W ~ N(0, w_std^2 / fan_in), b ~ N(0, b_std^2) and computes x @ W + b.

`train` is one run (one init seed); it returns the final accuracy on the split it is given to score
and, when given a monitoring split (the validation split, never the test split), a learning curve on
that split. Losses:
xent on the integer classes; mse, mse_centered (the network minus its initial function, the finite
counterpart of KRR with the NTK) and soft_xent (softmax(labels / temperature) as targets) on the
support's labels, learned ones included. docs/reproduction.md says which transfers best.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pipeline.errors import UserError
from pipeline.run.config import TrainConfig


class _ScaledLayer(nn.Module):
    """Shared fields of the NTK-or-standard parameterised layers."""

    features: int
    parameterization: str
    w_std: float
    b_std: float


class ScaledDense(_ScaledLayer):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        w = self.param("kernel", nn.initializers.normal(_init_std(self, fan_in)), (fan_in, self.features))
        return _scale_and_bias(self, x @ w, fan_in)


class ScaledConv(_ScaledLayer):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = 9 * x.shape[-1]
        init = nn.initializers.normal(_init_std(self, fan_in))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, kernel_init=init)(x)
        return _scale_and_bias(self, y, fan_in)


def _init_std(layer: _ScaledLayer, fan_in: int) -> float:
    """ntk: W ~ N(0, 1), scaled in the forward pass; standard: W ~ N(0, w_std^2 / fan_in)."""
    return 1.0 if layer.parameterization == "ntk" else layer.w_std / math.sqrt(fan_in)


def _scale_and_bias(layer: _ScaledLayer, y: jax.Array, fan_in: int) -> jax.Array:
    if layer.parameterization == "ntk":
        b = layer.param("bias", nn.initializers.normal(1.0), (layer.features,))
        return layer.w_std / math.sqrt(fan_in) * y + layer.b_std * b
    b = layer.param("bias", nn.initializers.normal(layer.b_std), (layer.features,))
    return y + b


class FullyConnected(nn.Module):
    config: TrainConfig
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = x.reshape(x.shape[0], -1)
        for _ in range(c.depth):
            x = nn.relu(ScaledDense(c.width, c.parameterization, c.w_std, c.b_std)(x))
        return ScaledDense(self.num_classes, c.parameterization, c.w_std, c.b_std)(x)


class ConvNet(nn.Module):
    config: TrainConfig
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for _ in range(c.conv_depth):
            x = nn.relu(ScaledConv(c.conv_width, c.parameterization, c.w_std, c.b_std)(x))
            if c.pooling == "avg":
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            elif c.pooling == "max":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return ScaledDense(self.num_classes, c.parameterization, c.w_std, c.b_std)(x)


def make_model(config: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network for `config`, after checking it can take images of `image_shape` (H, W, C)."""
    if len(image_shape) != 3:
        raise UserError(f"images have shape {tuple(image_shape)}; expected (height, width, channels)")
    if config.architecture == "conv" and config.pooling != "none":
        smallest = min(image_shape[:2])
        if smallest < 2 ** config.conv_depth:
            raise UserError(
                f"train.conv_depth={config.conv_depth} halves {image_shape[0]}x{image_shape[1]} images "
                f"{config.conv_depth} times, below one pixel; expected train.conv_depth <= {int(math.log2(smallest))} "
                "or train.pooling=none"
            )
    if config.architecture == "conv":
        return ConvNet(config, num_classes)
    return FullyConnected(config, num_classes)


@dataclass(frozen=True)
class TrainResult:
    accuracy: float  # on the scored split (x_eval, y_eval), once, after the last step
    train_accuracy: float
    curve: list[dict[str, float]]  # step, train_loss (+ val_accuracy on the monitoring split), every eval_every steps
    # The trained network's outputs (centred for centred losses) on any images, for inspection and tests.
    predict: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False, compare=False)


def train(
    x: np.ndarray,
    y: np.ndarray,
    classes: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    seed: int,
    *,
    monitor: tuple[np.ndarray, np.ndarray] | None = None,
    eval_batch: int = 2000,
    on_step: Callable[[], object] | None = None,
    solve_on: tuple[np.ndarray, np.ndarray] | None = None,
    solved: np.ndarray | None = None,
) -> TrainResult:
    """Train one network on (x, y) from init seed `seed`; score it once on (x_eval, y_eval) at the end.

    The learning curve (every config.eval_every steps) is scored on `monitor` (images, classes), the
    validation split: a curve is something people choose settings from, so it never reads x_eval
    when that is the test split. Without `monitor` the curve holds the training loss only.
    `on_step` is called after every step (a progress bar's update).
    With config.labels=solved, y is replaced by the labels solved for this network's own kernel at
    its initial parameters (`solved_labels`) on `solve_on` = (training images, classes), or by
    `solved` when the caller already has them for this seed (they depend on the init, not on the
    optimizer or label scale).

    y are regression targets (one row per image, e.g. KIP's learned labels) used by the mse,
    mse_centered and soft_xent losses; classes are the integer classes used by the xent loss and
    for train accuracy. With mse_centered the network is f(x) - f_0(x) throughout (training,
    train and test accuracy), f_0 the same network at its initial parameters, kept fixed.
    """
    model, params, key_batches = _init(config, x.shape[1:], num_classes, seed)
    if config.labels == "solved":
        y = solved if solved is not None else solved_labels(x, num_classes, config, seed, solve_on)
    anchor = params  # the initial parameters: f_0 for centred losses, unused otherwise
    optimizer, step_fn, apply_jit = _compiled(_program_settings(config), tuple(x.shape[1:]), num_classes)
    opt_state = optimizer.init(params)
    predict = lambda p, batch: apply_jit(p, anchor, batch)  # noqa: E731

    x_dev, y_dev = jnp.asarray(x, jnp.float32), jnp.asarray(training_targets(y, config), jnp.float32)
    c_dev = jnp.asarray(classes, jnp.int32)
    n, batch = len(x), min(config.batch_size, len(x))
    curve: list[dict[str, float]] = []
    for step in range(config.steps):
        if batch < n:
            idx = jax.random.choice(jax.random.fold_in(key_batches, step), n, (batch,), replace=False)
        else:
            idx = jnp.arange(n)
        params, opt_state, loss = step_fn(params, anchor, opt_state, x_dev[idx], y_dev[idx], c_dev[idx])
        done = step + 1
        if not np.isfinite(float(loss)):
            raise UserError(
                f"network training diverged (loss {float(loss)} at step {done}); lower train.learning_rate "
                f"(now {config.learning_rate})"
            )
        if on_step is not None:
            on_step()
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            point = {"step": done, "train_loss": float(loss)}
            if monitor is not None:
                point["val_accuracy"] = _accuracy(predict, params, monitor[0], monitor[1], eval_batch)
            curve.append(point)
    accuracy = _accuracy(predict, params, x_eval, y_eval, eval_batch)
    scale = config.label_scale if config.loss in ("mse", "mse_centered") else 1.0
    outputs = lambda images: np.asarray(predict(params, jnp.asarray(images, jnp.float32))) / scale  # noqa: E731
    return TrainResult(accuracy, _accuracy(predict, params, x, classes, eval_batch), curve, outputs)


def _program_settings(config: TrainConfig) -> TrainConfig:
    """`config` with the settings no compiled function reads set to fixed values: the label scale
    only scales the targets, the step counts and seeds only drive the loop and the init. Networks
    whose settings differ only there (a side's seeds, the label-scale candidates) share one model,
    optimizer and jitted step and apply (`_compiled`), so the process compiles them once."""
    return dataclasses.replace(config, label_scale=1.0, label_scale_choice="fixed", steps=1, eval_every=0, seeds=1,
                               seed=0, labels="support", labels_choice="fixed", temperature=1.0)


@functools.lru_cache(maxsize=64)
def _compiled(settings: TrainConfig, image_shape: tuple[int, ...], num_classes: int):
    """(optimizer, jitted step, jitted apply) for `_program_settings`; one per process and settings.

    A fresh closure per network would make XLA compile the same program again for each of a
    stage's networks (most of a small `train` stage's time); the same settings give the same
    program, so sharing it changes no result."""
    model = make_model(settings, image_shape, num_classes)
    apply = centered_apply(model.apply) if settings.loss in CENTERED_LOSSES else _anchored(model.apply)
    optimizer = _optimizer(settings)
    # anchor is passed as an argument, not baked into the compiled function
    return optimizer, _make_step(apply, optimizer, settings), jax.jit(apply)


def _init(config: TrainConfig, image_shape: tuple[int, ...], num_classes: int, seed: int):
    model = make_model(config, tuple(image_shape), num_classes)
    key_init, key_batches = jax.random.split(jax.random.PRNGKey(seed))
    return model, model.init(key_init, jnp.zeros((1, *image_shape), jnp.float32)), key_batches


def solved_labels(x: np.ndarray, num_classes: int, config: TrainConfig, seed: int,
                  solve_on: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The support labels solved for the kernel of the network `train` builds from `seed`
    (`network_kernel.solve_labels`), on `solve_on` = (training images, their classes)."""
    from pipeline.kernels import network_kernel

    if solve_on is None:
        raise UserError("train.labels=solved needs training images to solve the labels on; expected solve_on")
    _, params, _ = _init(config, x.shape[1:], num_classes, seed)
    return network_kernel.solve_labels(config, params, x, solve_on[0], solve_on[1], num_classes, config.solve_reg)


CENTERED_LOSSES = ("mse_centered",)


def centered_apply(apply: Callable) -> Callable:
    """(params, params_0, x) -> f(x; params) - f(x; params_0): zero at init, and under gradient descent
    on MSE in the kernel regime the kernel-regression predictor with the network's NTK (no random
    initial function added, as KRR has none)."""
    def centered(params: Any, anchor: Any, x: jax.Array) -> jax.Array:
        return apply(params, x) - jax.lax.stop_gradient(apply(anchor, x))
    return centered


def _anchored(apply: Callable) -> Callable:
    def plain(params: Any, anchor: Any, x: jax.Array) -> jax.Array:
        return apply(params, x)
    return plain


def training_targets(y: np.ndarray, config: TrainConfig) -> np.ndarray:
    """What the loss fits: soft_xent's class probabilities softmax(y / temperature), xent's nothing
    (it reads the classes), else label_scale * y."""
    y = np.asarray(y, np.float64)
    if config.loss != "soft_xent":
        return config.label_scale * y if config.loss in ("mse", "mse_centered") else y
    z = y / config.temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate)
    return optax.sgd(config.learning_rate, momentum=config.momentum or None)


def _make_step(apply: Callable, optimizer: optax.GradientTransformation, config: TrainConfig):
    def loss_fn(params: Any, anchor: Any, x: jax.Array, y: jax.Array, classes: jax.Array) -> jax.Array:
        out = apply(params, anchor, x)
        if config.loss == "xent":
            loss = optax.softmax_cross_entropy_with_integer_labels(out, classes).mean()
        elif config.loss == "soft_xent":
            loss = optax.softmax_cross_entropy(out, y).mean()
        else:
            loss = 0.5 * jnp.sum((out - y) ** 2, axis=-1).mean()
        if config.l2:
            loss = loss + 0.5 * config.l2 * sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return loss

    @jax.jit
    def step(params, anchor, opt_state, x, y, classes):
        loss, grads = jax.value_and_grad(loss_fn)(params, anchor, x, y, classes)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _accuracy(predict: Callable, params: Any, x: np.ndarray, labels: np.ndarray, batch: int) -> float:
    correct = 0
    for start in range(0, len(x), batch):
        logits = predict(params, jnp.asarray(x[start:start + batch], jnp.float32))
        correct += int(jnp.sum(jnp.argmax(logits, axis=-1) == jnp.asarray(labels[start:start + batch])))
    return correct / len(x)
