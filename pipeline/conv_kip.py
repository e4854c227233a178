"""KIP with a random-feature ConvNet kernel (`conv_features`): ConvNet-kernel supports on a CPU.

Every step draws `features.networks` fresh random ConvNets (a pure function of (seed, step)) and
takes one Adam step on the support's images (and labels, when learned) against

    loss = 0.5 * mean((y_t - K_ts (K_ss + ridge I)^-1 y_s)^2),   K = estimated NNGP of that draw

as RFAD does (Loo et al., NeurIPS 2022). Resampling keeps the support from fitting one draw's
noise; the expected loss is KIP's loss under the exact kernel up to the estimate's bias.
`loss="cross_entropy"` replaces the squared error by RFAD's Platt-scaled cross-entropy,
softmax(T * K_ts (K_ss + ridge I)^-1 y_s) against the targets' classes, with the temperature T
learned alongside the support (log-parameterised, from INITIAL_TEMPERATURE). KRR still predicts by
the argmax of K_ts alpha, which T does not change; the loss only stops paying for squared error on
targets that are already classified right, which is what accuracy asks for: on MNIST, 100 images,
it scored 98.1 % on the monitor's validation images at step 100, where the squared error was at
97.7 % after 2000 (benchmarks/results/conv_kip_mnist_ce.json, conv_kip_mnist.json). Target
features need no gradient, so a step is one forward pass of the targets and one forward-backward
pass of the support through the networks.

Progress is scored on validation images with a kernel of `monitor_networks` networks drawn from a
stream training never uses, and the support of the best-scoring step is kept (the test split is
never read here). The loop checkpoints every `checkpoint_every` steps and resumes bit-for-bit:
target batches and network draws depend on (seed, step) alone, and the checkpoint holds the
support, the Adam state, the best support so far and the history.

Kept apart from `kip` because the kernel is random per step: `kip`'s loss, blocking and
checkpoints assume a fixed kernel function of two images.

The pipeline reaches this loop through `kernel.architecture: conv_rf` (`pipeline_settings` maps the
kernel and distill sections onto it); evaluation and Label Solve then use `EvaluationKernel`, one
fixed draw of `kernel.rf_eval_networks` networks from a stream that neither training nor
monitoring draws from, the same draw for every run so that supports are compared under one kernel.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pipeline import atomic, conv_features, kip, krr
from pipeline.config import KIP_LOSSES, LR_SCHEDULES, DistillConfig, KernelConfig
from pipeline.conv_features import (EVAL_SEED, EVAL_STREAM, MONITOR_STREAM, TRAIN_STREAM, ConvFeatureConfig,
                                     EvaluationKernel, feature_config, network_key)
from pipeline.errors import UserError, check_choice, check_positive

PIPELINE_VAL_IMAGES = 2000  # kernel.architecture=conv_rf monitors on the first 2,000 validation images
INITIAL_TEMPERATURE = 10.0  # Platt scale at step 0: softmax of 10 x a one-hot-sized prediction is confident but not saturated


@dataclasses.dataclass(frozen=True)
class ConvKipConfig:
    """The loop: Adam `learning_rate` (constant, or cosine-decayed to zero over the run:
    `lr_schedule`) for `steps` on class-balanced batches of `target_batch` training images; `reg`
    is the ridge relative to K_ss's mean diagonal; validation (its first `val_images`) is scored
    every `eval_every` steps with `monitor_networks` networks; `loss` is
    KIP's squared error (`mse`) or the Platt-scaled cross-entropy (`cross_entropy`)."""

    support_per_class: int = 10
    steps: int = 2000
    learning_rate: float = 0.01
    target_batch: int = 500
    reg: float = 1e-6
    learn_labels: bool = True
    eval_every: int = 100
    val_images: int = 2000
    monitor_networks: int = 16
    checkpoint_every: int = 100
    seed: int = 0
    loss: str = "mse"
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        for name in ("support_per_class", "steps", "target_batch", "eval_every", "val_images",
                     "monitor_networks", "checkpoint_every"):
            check_positive(f"conv_kip.{name}", getattr(self, name), integer=True)
        check_positive("conv_kip.learning_rate", self.learning_rate)
        check_positive("conv_kip.reg", self.reg)
        check_choice("conv_kip.loss", self.loss, KIP_LOSSES)
        check_choice("conv_kip.lr_schedule", self.lr_schedule, LR_SCHEDULES)


class ConvKipResult(NamedTuple):
    images: np.ndarray  # the support at the best validation step (float32)
    labels: np.ndarray
    classes: np.ndarray  # the class each support image started from
    best_step: int
    history: list[dict[str, float]]  # {"step", "loss"}; "val_accuracy" every eval_every
    initial_images: np.ndarray  # the real images the support started from


def pipeline_settings(kernel: KernelConfig, config: DistillConfig) -> tuple[ConvFeatureConfig, ConvKipConfig]:
    """The loop's settings for `kernel.architecture: conv_rf`; refuses distill keys it has no
    counterpart for, rather than ignoring them."""
    unsupported = (("init", "real"), ("corruption", 0.0), ("float64", False))
    for name, only in unsupported:
        if getattr(config, name) != only:
            raise UserError(f"distill.{name}={getattr(config, name)!r} is not available with "
                            f"kernel.architecture=conv_rf; expected {name}: {str(only).lower()}")
    if config.eval_every < 1:
        raise UserError("distill.eval_every=0 is not allowed with kernel.architecture=conv_rf (it keeps the step "
                        "that does best on validation); expected a positive number of steps")
    check_positive("distill.reg", config.reg)
    loop = ConvKipConfig(
        support_per_class=config.support_per_class, steps=config.steps, learning_rate=config.learning_rate,
        target_batch=config.target_batch, reg=config.reg, learn_labels=config.learn_labels,
        eval_every=config.eval_every, val_images=PIPELINE_VAL_IMAGES, monitor_networks=kernel.rf_eval_networks,
        checkpoint_every=config.checkpoint_every or config.steps, seed=config.seed, loss=config.loss,
        lr_schedule=config.lr_schedule,
    )
    return feature_config(kernel), loop


def predictions(support: tuple[jax.Array, jax.Array], params: Any, x_t: jax.Array, features: ConvFeatureConfig,
                reg: float) -> jax.Array:
    """K_ts (K_ss + ridge I)^-1 y_s under one draw of random networks; no gradient flows into the targets."""
    f_s = conv_features.features(params, support[0], features)
    f_t = jax.lax.stop_gradient(conv_features.features(params, x_t, features))
    k_ss = conv_features.kernel_from_features(f_s, f_s, features)
    k_ts = conv_features.kernel_from_features(f_t, f_s, features)
    return k_ts @ krr.fit(k_ss, support[1], reg)


def loss(support: tuple[jax.Array, jax.Array], params: Any, x_t: jax.Array, y_t: jax.Array,
         features: ConvFeatureConfig, reg: float) -> jax.Array:
    """KIP's loss under one draw of random networks: 0.5 mean squared error of the predictions."""
    return 0.5 * jnp.mean((predictions(support, params, x_t, features, reg) - y_t) ** 2)


def cross_entropy_loss(support: tuple[jax.Array, jax.Array], log_temperature: jax.Array, params: Any, x_t: jax.Array,
                       y_t: jax.Array, features: ConvFeatureConfig, reg: float) -> jax.Array:
    """Mean cross-entropy of softmax(exp(log_temperature) x predictions) against the targets'
    classes (the argmax of their label rows)."""
    logits = jnp.exp(log_temperature) * predictions(support, params, x_t, features, reg)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(y_t, axis=1)))


def krr_accuracy(images: np.ndarray, labels: np.ndarray, x: np.ndarray, y: np.ndarray, params: Any,
                 features: ConvFeatureConfig, reg: float, block_size: int = 500) -> float:
    """Accuracy of KRR fitted on (images, labels) with the kernel of `params`' networks."""
    return krr.accuracy(krr_predictions(images, labels, x, params, features, reg, block_size), y)


def krr_predictions(images: np.ndarray, labels: np.ndarray, x: np.ndarray, params: Any,
                    features: ConvFeatureConfig, reg: float, block_size: int = 500) -> np.ndarray:
    """KRR's outputs on `x` (one row per image), fitted on (images, labels) with the kernel of
    `params`' networks. Everything after the support is computed `block_size` rows at a time, so
    the rows of one whole block scored alone come out as they do in a full scoring
    (tests/test_published_supports.py re-scores a block against a full scoring's predictions)."""
    f_s = conv_features.feature_rows(params, images, features, block_size)
    k_ss = jnp.asarray(f_s @ f_s.T + features.b_std ** 2)
    alpha = np.asarray(krr.fit(k_ss, jnp.asarray(labels, jnp.float32), reg))
    f_x = conv_features.feature_rows(params, x, features, block_size)
    return np.concatenate([(f_x[start:start + block_size] @ f_s.T + features.b_std ** 2) @ alpha
                           for start in range(0, len(f_x), block_size)])


def distill(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
            features: ConvFeatureConfig, config: ConvKipConfig, *, checkpoint: Path | None = None,
            checkpoint_key: str | None = None, progress: bool = True) -> ConvKipResult:
    """Learn a support from class-balanced real training images; resumes from `checkpoint` if it
    holds a run of the same settings (and the same `checkpoint_key`: the pipeline's digest of its
    data, code and machine, `workflow.checkpoint_key`)."""
    if len(y_val) == 0:
        raise UserError("conv KIP keeps the step that does best on validation; set data.validation_fraction > 0")
    conv_features.check_image_shape(features, x_train.shape[1:])
    shape = x_train.shape[1:]
    rng = np.random.default_rng([config.seed, 0])
    idx = kip.class_balanced_indices(y_train, config.support_per_class, num_classes, rng)
    classes = y_train[idx]
    # What Adam learns: the images, the labels and the log of the Platt temperature (unused, and so
    # never moved, by the squared error: Adam's update of a zero gradient is zero).
    support = (jnp.asarray(x_train[idx], jnp.float32), jnp.asarray(krr.centered_one_hot(classes, num_classes)),
               jnp.log(jnp.float32(INITIAL_TEMPERATURE)))
    optimizer = optax.adam(kip.learning_rate_schedule(config.lr_schedule, config.learning_rate, config.steps))
    state = optimizer.init(support)

    def step_loss(images, labels, log_temperature, params, x_t, y_t):
        if not config.learn_labels:
            labels = jax.lax.stop_gradient(labels)
        if config.loss == "cross_entropy":
            return cross_entropy_loss((images, labels), log_temperature, params, x_t, y_t, features, config.reg)
        return loss((images, labels), params, x_t, y_t, features, config.reg)

    @jax.jit
    def step(support, state, key, x_t, y_t):
        params = conv_features.init(key, features, shape)
        value, grads = jax.value_and_grad(step_loss, argnums=(0, 1, 2))(*support, params, x_t, y_t)
        updates, state = optimizer.update(grads, state, support)
        return value, optax.apply_updates(support, updates), state

    monitor_features = dataclasses.replace(features, networks=config.monitor_networks)
    monitor_params = conv_features.init(network_key(config.seed, MONITOR_STREAM, 0), monitor_features, shape)
    x_mon, y_mon = x_val[: config.val_images], y_val[: config.val_images]

    def val_accuracy(support) -> float:
        return krr_accuracy(np.asarray(support[0]), np.asarray(support[1]), x_mon, y_mon, monitor_params,
                            monitor_features, config.reg)

    settings = {"features": dataclasses.asdict(features), "config": dataclasses.asdict(config),
                "shape": list(shape), "train_images": int(len(y_train))}
    if checkpoint_key is not None:
        settings["key"] = checkpoint_key
    resumed = _load_checkpoint(checkpoint, settings, support, state) if checkpoint else None
    if resumed:
        start, support, state, best, history = resumed
    else:
        first = val_accuracy(support)
        start, best, history = 0, (first, 0, support), [{"step": 0, "val_accuracy": first}]
    bar = tqdm(range(start + 1, config.steps + 1), desc="conv KIP", disable=not progress, mininterval=1.0)
    for t in bar:
        target = kip.target_indices(y_train, num_classes, config.target_batch, config.seed, t)
        y_t = jnp.asarray(krr.centered_one_hot(y_train[target], num_classes))
        value, support, state = step(support, state, network_key(config.seed, TRAIN_STREAM, t),
                                     jnp.asarray(x_train[target]), y_t)
        value = float(value)
        if not np.isfinite(value):
            raise UserError(f"conv KIP diverged at step {t}; lower conv_kip.learning_rate (now "
                            f"{config.learning_rate}) or raise conv_kip.reg (now {config.reg})")
        point: dict[str, float] = {"step": t, "loss": value}
        if config.loss == "cross_entropy":
            point["temperature"] = float(jnp.exp(support[2]))
        if t % config.eval_every == 0 or t == config.steps:
            point["val_accuracy"] = val_accuracy(support)
            bar.set_postfix(val=f"{point['val_accuracy']:.4f}", best=f"{max(best[0], point['val_accuracy']):.4f}")
            if point["val_accuracy"] > best[0]:
                best = (point["val_accuracy"], t, support)
        history.append(point)
        if checkpoint and (t % config.checkpoint_every == 0 or t == config.steps):
            _save_checkpoint(checkpoint, settings, t, support, state, best, history)
    images_out, labels_out = (np.asarray(a, np.float32) for a in best[2][:2])
    if not (np.isfinite(images_out).all() and np.isfinite(labels_out).all()):
        raise UserError("conv KIP produced a non-finite support; expected finite images and labels")
    return ConvKipResult(images_out, labels_out, np.asarray(classes), best[1], history,
                         np.asarray(x_train[idx], np.float32))


_CHECKPOINT_KIND = "conv-kip-checkpoint"  # one of kip.CHECKPOINT_KINDS


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(path: Path, settings: dict, step: int, support, state, best, history) -> None:
    leaves = jax.tree_util.tree_leaves((support, state, best[2]))
    meta = {"kind": _CHECKPOINT_KIND, "key": _settings_key(settings), "step": step, "best_accuracy": best[0],
            "best_step": best[1], "history": history}
    arrays = {f"leaf_{i:03d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
    atomic.save_npz(path, arrays)


def _load_checkpoint(path: Path, settings: dict, support, state):
    """(step, support, state, best, history) from a checkpoint of the same settings; None if there is
    none, or if it belongs to other settings or to the fixed-kernel loop (it is then replaced, as
    `kip` does). A file that is not one of our checkpoints is refused (kip.read_checkpoint)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    meta, leaves = kip.read_checkpoint(path)
    if meta.get("kind") != _CHECKPOINT_KIND or meta.get("key") != _settings_key(settings):
        tqdm.write(f"conv KIP: checkpoint {path} belongs to other settings or code; starting from step 0",
                   file=sys.stderr)
        return None
    template, treedef = jax.tree_util.tree_flatten((support, state, support))
    if len(leaves) != len(template) or any(leaf.shape != t.shape for leaf, t in zip(leaves, template)):
        raise UserError(f"checkpoint {path} matches this run's settings but not its shapes; delete it to start afresh")
    support, state, best_support = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(leaf, t.dtype) for leaf, t in zip(leaves, template)])
    tqdm.write(f"conv KIP: resuming from {path} at step {meta['step']}", file=sys.stderr)
    return meta["step"], support, state, (meta["best_accuracy"], meta["best_step"], best_support), meta["history"]
