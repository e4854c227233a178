"""Kernel Inducing Points (Nguyen, Chen, Lee, ICLR 2021, arXiv 2011.00050): the one KIP engine.

KIP learns a support set (x_s, y_s) so that kernel ridge regression fitted on it predicts a
target batch (x_t, y_t) well:

    loss = 0.5 * mean((y_t - K_ts (K_ss + ridge I)^-1 y_s)^2)

with gradients through the kernel into the support pixels (and into y_s when labels are learned),
optimised with Adam. Target batches are drawn class-balanced from the training split at each step.
`loss="cross_entropy"` replaces the squared error by RFAD's Platt-scaled cross-entropy (Loo et al.,
NeurIPS 2022), softmax(T * K_ts (K_ss + ridge I)^-1 y_s) against the targets' classes, with the
temperature T learned alongside the support (log-parameterised, from INITIAL_TEMPERATURE). KRR
still predicts by the argmax of K_ts alpha, which T does not change; the loss only stops paying for
squared error on targets that are already classified right, which is what accuracy asks for.

Every kernel goes through this loop (`KipKernel`): fixed kernel functions (closed-form FC and
RBF, neural-tangents' exact ConvNet kernel: `FixedKernel`), kernels drawn afresh every step (the
random-feature ConvNet NNGP, `conv_features.RandomFeatureKernel`; a finite network's empirical
NTK, `finite_ntk.FiniteNetworkKernel`). A kernel says what a step draws (`draw`), how KRR is
fitted on the support under that draw (`fit`) and how it predicts (`predict`); everything else,
the options and the guarantees, lives here once:

- init from real images or noise; corruption (pixels that are noise and never learned);
- learned labels; MSE or Platt cross-entropy; constant or cosine learning rate;
- augmentation of the targets and/or the support (`augment`);
- the step kept: the last, or the best on validation (the test split is never read here);
- divergence checks (a loss 10x its first, non-finite values, a run that ends worse than it began);
- a checkpoint every `checkpoint_every` steps, written by process 0 only, resumed bit-for-bit: the
  target batch, the kernel draw and the augmentation of step t are functions of (seed, t) alone,
  and the checkpoint holds the support, the full Adam state, the best support and the history;
- several processes (the target rows split across every device of every process).

Label Solve (`label_solve`) is the closed-form alternative to the loop for fixed kernels.
"""
from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pipeline.compat import enable_x64
from tqdm.auto import tqdm

from pipeline.artifacts import atomic, safe_read
from pipeline.distill import augment, krr
from pipeline.errors import UserError
from pipeline.kernels import functions as kernels
from pipeline.kernels.functions import KernelFn
from pipeline.run import devices, distributed
from pipeline.run.config import DistillConfig

Monitor = Callable[[np.ndarray, np.ndarray], dict[str, float]]
INITIAL_TEMPERATURE = 10.0  # Platt scale at step 0: softmax of 10 x a one-hot-sized prediction is confident but not saturated
BLOWUP_FACTOR = 10.0  # a step loss this many times the first one means the run has diverged


class DivergenceError(UserError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


class KipKernel(Protocol):
    """What the engine needs of a kernel. `draw(step)` runs on the host and returns the step's
    randomness as arrays (None for a fixed kernel); `fit` and `predict` run inside the jitted step.

    settings: what identifies the kernel in a checkpoint's key. refusals: {option: why} for options
    this kernel cannot honour (the engine refuses them in one line naming the option).
    """

    settings: dict[str, Any]
    refusals: dict[str, str]

    def draw(self, step: int) -> Any: ...

    def fit(self, draw: Any, images: jax.Array, labels: jax.Array, reg: float) -> Any: ...

    def predict(self, draw: Any, fitted: Any, x: jax.Array) -> jax.Array: ...


class FixedKernel:
    """A kernel function k(x1, x2) (`kernels.make`): the same kernel at every step. The target rows
    are split across devices (`devices.shard_rows`), so several devices and processes share a step."""

    refusals: dict[str, str] = {}

    def __init__(self, kernel_fn: KernelFn, settings: dict[str, Any] | None = None):
        self.kernel_fn = kernel_fn
        self.settings = settings or {"kernel": "fixed"}

    def draw(self, step: int) -> None:
        return None

    def fit(self, draw: None, images: jax.Array, labels: jax.Array, reg: float) -> tuple[jax.Array, jax.Array]:
        k_ss = kernels.self_kernel(self.kernel_fn, images, symmetric_use=True)  # krr.fit's gradient is symmetric
        return images, krr.fit(k_ss, labels, reg)

    def predict(self, draw: None, fitted: tuple[jax.Array, jax.Array], x: jax.Array) -> jax.Array:
        images, alpha = fitted
        return krr.predict(self.kernel_fn(devices.shard_rows(x), images), alpha)


def as_kip_kernel(kernel: KipKernel | KernelFn) -> KipKernel:
    """A kernel function is a fixed kernel; anything with `fit` is already a KIP kernel."""
    return kernel if hasattr(kernel, "fit") and hasattr(kernel, "draw") else FixedKernel(kernel)


class Support(NamedTuple):
    images: jax.Array  # (n_s, H, W, C)
    labels: jax.Array  # (n_s, C) regression targets
    log_temperature: jax.Array | None = None  # the Platt scale's log; None (no leaf) for the squared error


@dataclass
class KipResult:
    images: np.ndarray
    labels: np.ndarray  # (n_s, C) final (possibly learned) label vectors
    classes: np.ndarray  # (n_s,) class each support image was initialised from
    initial_images: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None  # keep=best_validation: the step whose support this is


def _row_losses(predictions: jax.Array, y: jax.Array, log_temperature: jax.Array | None) -> jax.Array:
    """Per target: the squared error summed over classes, or the Platt cross-entropy."""
    if log_temperature is None:
        return jnp.sum((predictions - y) ** 2, axis=1)
    logits = jnp.exp(log_temperature) * predictions
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(y, axis=1))


def kip_loss(
    kernel: KipKernel | KernelFn,
    reg: float,
    support: Support,
    x_t: jax.Array,
    y_t: jax.Array,
    kernel_block: int | None = None,
    draw: Any = None,
) -> jax.Array:
    """The KIP objective for one target batch: 0.5 x the mean squared error per entry, or the mean
    Platt cross-entropy when the support carries a temperature.

    kernel_block: the most kernel entries (targets x support images) one K_ts block may hold. A
    larger batch is summed block by block with the blocks' forward pass recomputed in the backward
    one (jax.checkpoint), so memory is O(kernel_block) for any batch, at the price of one more K_ts
    per extra block: blocking only pays when the kernel would not fit, hence a budget in entries
    rather than in targets (at 100 support images, 20,000 targets are 8 MB of kernel).
    """
    kernel = as_kip_kernel(kernel)
    fitted = kernel.fit(draw, support.images, support.labels, reg)
    cross_entropy = support.log_temperature is not None  # averaged over targets; the squared error over entries

    def row_losses(x_block, y_block):
        return _row_losses(kernel.predict(draw, fitted, x_block), y_block, support.log_temperature)

    n_t = x_t.shape[0]
    most_targets = max(1, kernel_block // support.images.shape[0]) if kernel_block else n_t
    if n_t <= most_targets:
        if cross_entropy:
            return jnp.mean(row_losses(x_t, y_t))
        return 0.5 * jnp.mean(row_losses(x_t, y_t)) / y_t.shape[1]
    blocks = -(-n_t // most_targets)
    target_block = -(-n_t // blocks)  # equal blocks: at most blocks - 1 padded rows, not a block's worth
    pad = blocks * target_block - n_t
    weight = jnp.concatenate([jnp.ones(n_t, y_t.dtype), jnp.zeros(pad, y_t.dtype)])
    x_pad, y_pad = x_t, y_t
    if pad:  # copies of a real row keep the padding finite; their weight is 0
        x_pad = jnp.concatenate([x_t, jnp.repeat(x_t[:1], pad, axis=0)])
        y_pad = jnp.concatenate([y_t, jnp.repeat(y_t[:1], pad, axis=0)])
    block_error = jax.checkpoint(lambda x, y, w: jnp.sum(w * row_losses(x, y)))

    def add_block(total, block):
        return total + block_error(*block), None

    shaped = (
        x_pad.reshape((blocks, target_block) + x_t.shape[1:]),
        y_pad.reshape(blocks, target_block, y_t.shape[1]),
        weight.reshape(blocks, target_block),
    )
    total, _ = jax.lax.scan(add_block, jnp.zeros((), y_t.dtype), shaped)
    if cross_entropy:
        return total / n_t
    return 0.5 * total / (n_t * y_t.shape[1])


def make_step(
    kernel: KipKernel | KernelFn,
    optimizer: optax.GradientTransformation,
    config: DistillConfig,
    frozen: np.ndarray | None = None,
):
    """One jitted KIP update: gather the target batch, augment, value-and-grad, Adam.

    The target batch is split by rows across all devices (`devices`); everything else is
    replicated. Shapes never change between steps, so the step compiles once.
    frozen: boolean mask over the support pixels that must never change (corruption). Their
    gradient is zeroed before Adam, so Adam's moments, and hence their updates, stay exactly 0.
    """
    kernel = as_kip_kernel(kernel)
    frozen_mask = None if frozen is None or not frozen.any() else jnp.asarray(frozen)
    augmenting = config.augment != "none"
    on_targets = augmenting and config.augment_on in ("target", "both")
    on_support = augmenting and config.augment_on in ("support", "both")

    def loss_fn(support: Support, x_t, y_t, draw, augment_key):
        if not config.learn_labels:
            support = support._replace(labels=jax.lax.stop_gradient(support.labels))
        if augmenting:
            target_key, support_key = jax.random.split(augment_key)
            if on_targets:
                x_t = augment.apply(target_key, x_t, config.augment, config.augment_pad)
            if on_support:
                support = support._replace(
                    images=augment.apply(support_key, support.images, config.augment, config.augment_pad))
        return kip_loss(kernel, config.reg, support, x_t, y_t, config.kernel_block, draw)

    @jax.jit
    def step(support: Support, opt_state, x_train, y_train, target_idx, draw=None, augment_key=None):
        x_t = devices.shard_rows(jnp.take(x_train, target_idx, axis=0))
        y_t = devices.shard_rows(jnp.take(y_train, target_idx, axis=0))
        loss, grads = jax.value_and_grad(loss_fn)(support, x_t, y_t, draw, augment_key)
        if frozen_mask is not None:
            grads = grads._replace(images=jnp.where(frozen_mask, 0.0, grads.images))
        updates, opt_state = optimizer.update(grads, opt_state, support)
        return optax.apply_updates(support, updates), opt_state, loss

    return step


def class_balanced_indices(labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of each class, without replacement, grouped by class."""
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise UserError(
                f"class {c} has {len(members)} training images; distill.support_per_class and the "
                f"target batch need at most that many per class (asked for {per_class})"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.concatenate(chosen)


def target_indices(labels: np.ndarray, num_classes: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The class-balanced target batch of one step; a pure function of (seed, step) for resumability."""
    if batch >= len(labels):
        return np.arange(len(labels), dtype=np.int32)
    per_class = min(batch // num_classes, int(np.bincount(labels, minlength=num_classes).min()))
    if per_class == 0:
        raise UserError(f"distill.target_batch={batch} is too small; expected at least {num_classes} (one per class)")
    rng = np.random.default_rng([seed, 1, step])
    return class_balanced_indices(labels, per_class, num_classes, rng).astype(np.int32)


def learning_rate_schedule(schedule: str, learning_rate: float, steps: int) -> optax.ScalarOrSchedule:
    """Constant, or cosine decay to zero over the run's `steps` (settles the support at the end)."""
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, decay_steps=steps)
    return learning_rate


def init_support(
    x_train: np.ndarray, y_train: np.ndarray, num_classes: int, config: DistillConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced real images, or Gaussian noise matched to the data's mean and std; then the
    `config.corruption` fraction of pixels (`corruption_mask`) replaced by such noise."""
    rng = np.random.default_rng([config.seed, 0])
    idx = class_balanced_indices(y_train, config.support_per_class, num_classes, rng)
    classes = y_train[idx]
    shape = (len(idx),) + x_train.shape[1:]
    if config.init == "real":
        images = x_train[idx]
    else:
        images = (rng.standard_normal(shape) * x_train.std() + x_train.mean()).astype(np.float32)
    return _corrupt(np.asarray(images, np.float32), x_train, config), classes


def _corrupt(images: np.ndarray, x_train: np.ndarray, config: DistillConfig) -> np.ndarray:
    mask = corruption_mask(images.shape, config)
    if not mask.any():
        return images
    noise_rng = np.random.default_rng([config.seed, 6])
    noise = noise_rng.standard_normal(images.shape) * x_train.std() + x_train.mean()
    return np.asarray(np.where(mask, noise, images), np.float32)


def corruption_mask(shape: tuple[int, ...], config: DistillConfig) -> np.ndarray:
    """The pixels that are noise and stay noise: round(corruption x pixels) of every image, placed
    at random from the seed."""
    if not config.corruption:
        return np.zeros(shape, bool)
    pixels = int(np.prod(shape[1:]))
    corrupted = int(round(config.corruption * pixels))  # exactly this many in every image
    scores = np.random.default_rng([config.seed, 4]).random((shape[0], pixels))
    ranks = np.argsort(np.argsort(scores, axis=1), axis=1)
    return (ranks < corrupted).reshape(shape)


def check_options(kernel: KipKernel | KernelFn, config: DistillConfig) -> None:
    """Refuse, in one line, an option the kernel cannot honour (its `refusals` say why)."""
    kernel = as_kip_kernel(kernel)
    asked = {
        "distill.float64": config.float64,
        "several processes": distributed.process_count() > 1,
    }
    for option, wanted in asked.items():
        if wanted and option in kernel.refusals:
            raise UserError(f"{option} is not available with {kernel.settings.get('name', 'this kernel')}: "
                            f"{kernel.refusals[option]}")


def distill(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    kernel: KipKernel | KernelFn,
    config: DistillConfig,
    *,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    monitor: Monitor | None = None,
    start: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
) -> KipResult:
    """Run KIP on preprocessed training images (NHWC) with integer labels.

    kernel: a `KipKernel`, or a kernel function k(x1, x2) (a fixed kernel).
    checkpoint: where to save (every `config.checkpoint_every` steps) and resume from. A checkpoint
        whose key differs (other data, kernel, params or code: `checkpoint_key`) is replaced.
    monitor: called before the first step and every `config.eval_every` steps with (images, labels);
        its numbers join the history (the step-0 record has no loss). keep=best_validation keeps
        the support of the step whose "val_accuracy" is highest (the earliest of equals).
    start: (images, labels, classes) to start from instead of `config.init`'s support (e.g. a KIP
        support to fine-tune for another kernel); corruption does not apply to it.
    """
    kernel = as_kip_kernel(kernel)
    check_options(kernel, config)
    if start is None and config.support_per_class * num_classes > len(y_train):
        raise UserError(
            f"distill.support_per_class={config.support_per_class} needs "
            f"{config.support_per_class * num_classes} training images; the training split has {len(y_train)} (without the validation split)"
        )
    if start is not None and config.corruption:
        raise UserError(f"distill.corruption={config.corruption} corrupts the support KIP initialises itself; a given "
                        "start support has no corrupted pixels: expected corruption: 0 with a start support")
    if config.keep == "best_validation" and monitor is None:
        raise UserError("distill.keep=best_validation needs a validation split scored every distill.eval_every steps; "
                        "set eval_every >= 1 and data.validation_fraction > 0, or keep: last")
    with enable_x64(config.float64):
        return _Run(x_train, y_train, num_classes, kernel, config, checkpoint, checkpoint_key, monitor, start).run(progress)


class _Run:
    """One KIP run's state: the support, Adam's state, the best support so far and the history."""

    def __init__(self, x_train, y_train, num_classes, kernel, config, checkpoint, checkpoint_key, monitor, start):
        self.x_train, self.y_train, self.num_classes = x_train, y_train, num_classes
        self.kernel, self.config, self.monitor = kernel, config, monitor
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        dtype = jnp.float64 if config.float64 else jnp.float32
        if start is None:
            self.initial_images, self.classes = init_support(x_train, y_train, num_classes, config)
            labels = krr.centered_one_hot(self.classes, num_classes)
            self.frozen = corruption_mask(self.initial_images.shape, config)
        else:
            self.initial_images, labels, self.classes = (np.asarray(a) for a in start)
            self.initial_images = np.asarray(self.initial_images, np.float32)
            self.frozen = None
        temperature = jnp.log(jnp.asarray(INITIAL_TEMPERATURE, dtype)) if config.loss == "cross_entropy" else None
        self.support = Support(jnp.asarray(self.initial_images, dtype), jnp.asarray(labels, dtype), temperature)
        self.optimizer = optax.adam(learning_rate_schedule(config.lr_schedule, config.learning_rate, config.steps))
        self.opt_state = self.optimizer.init(self.support)
        self.best: tuple[float, int, Support] | None = None
        self.history: list[dict[str, float]] = []
        self.key = _key(checkpoint_key, kernel, config, x_train.shape, start)
        self.x_dev = devices.put_replicated(np.asarray(x_train, dtype))
        self.y_dev = devices.put_replicated(np.asarray(krr.centered_one_hot(y_train, num_classes), dtype))

    def step_inputs(self, step: int) -> tuple:
        """A step's target batch, kernel draw and augmentation key: functions of (seed, step) alone."""
        config = self.config
        idx = target_indices(self.y_train, self.num_classes, config.target_batch, config.seed, step)
        augment_key = augment.step_key(config.seed, step) if config.augment != "none" else None
        return idx, self.kernel.draw(step), augment_key

    def run(self, progress: bool) -> KipResult:
        config = self.config
        start = 0
        if self.checkpoint is not None:
            start = self._resume()
            # Process 0 writes the checkpoint; each process reads it. They must start from the same step.
            distributed.same_on_every_process(start, "the step the checkpoint resumes from")
        self.support, self.opt_state = devices.replicate_tree((self.support, self.opt_state))
        if self.monitor is not None and config.eval_every and start == 0:
            # The starting point of the learning curve: how good the initial support already is.
            self._record({"step": 0}, 0)
        step_fn = make_step(self.kernel, self.optimizer, config, self.frozen)
        last_saved = start
        first_loss = next((h["loss"] for h in self.history if "loss" in h), None)
        with tqdm(total=config.steps, initial=start, desc="KIP", unit="step", disable=not progress,
                  dynamic_ncols=True) as bar:
            for step in range(start, config.steps):
                new_support, new_opt_state, loss = step_fn(self.support, self.opt_state, self.x_dev, self.y_dev,
                                                           *self.step_inputs(step))
                loss = float(devices.to_host(loss))
                first_loss = loss if first_loss is None else first_loss
                self._check_loss(loss, first_loss, step, last_saved)
                self.support, self.opt_state = new_support, new_opt_state
                done = step + 1
                record: dict[str, float] = {"step": done, "loss": loss}
                if self.support.log_temperature is not None:
                    record["temperature"] = float(jnp.exp(devices.to_host(self.support.log_temperature)))
                if self.monitor is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    self._record(record, done)
                else:
                    self.history.append(record)
                bar.update(1)
                if done % 10 == 0 or done == config.steps:
                    bar.set_postfix(loss=f"{loss:.4g}")
                if self.checkpoint is not None and config.checkpoint_every and (
                        done % config.checkpoint_every == 0 or done == config.steps):
                    self._check_finite(self.support)  # never let a checkpoint hold a diverged support
                    self._save(done)
                    last_saved = done
        # The run's verdict on its own result: the final support, scored on the first step's target
        # batch, must be finite and no worse than the support it started from on that same batch.
        # (A step's loss is taken before its update, so the last update is otherwise never checked.)
        _, _, end_loss = step_fn(self.support, self.opt_state, self.x_dev, self.y_dev, *self.step_inputs(0))
        self._check_result(float(devices.to_host(end_loss)), first_loss)
        kept, best_step = self.support, None
        if config.keep == "best_validation":
            _, best_step, kept = self.best
            self._check_finite(kept)
        return KipResult(
            images=devices.to_host(kept.images).astype(np.float32),
            labels=devices.to_host(kept.labels).astype(np.float32),
            classes=np.asarray(self.classes),
            initial_images=self.initial_images,
            history=self.history,
            best_step=best_step,
        )

    def _record(self, record: dict[str, float], step: int) -> None:
        """Score the support on validation into `record`; remember it if it is the best so far."""
        images, labels = devices.to_host(self.support.images), devices.to_host(self.support.labels)
        record.update(self.monitor(images, labels))
        self.history.append(record)
        if self.config.keep == "best_validation" and (self.best is None or record["val_accuracy"] > self.best[0]):
            self.best = (record["val_accuracy"], step, self.support)

    # --- the divergence and finiteness checks ---------------------------------------------------

    def _check_loss(self, loss: float, first_loss: float, step: int, saved: int) -> None:
        """Stop before a diverged state is kept: a non-finite loss, or one BLOWUP_FACTOR x the first."""
        if np.isfinite(loss) and (loss <= BLOWUP_FACTOR * first_loss or first_loss == 0):
            return
        config = self.config
        what = f"became {loss}" if not np.isfinite(loss) else f"rose to {loss:.4g}, over {BLOWUP_FACTOR:g}x its first {first_loss:.4g},"
        where = f"; last good checkpoint: {self.checkpoint} (step {saved})" if self.checkpoint and saved else ""
        raise DivergenceError(
            f"KIP loss {what} at step {step + 1}: lower distill.learning_rate (now {config.learning_rate})"
            f" or raise distill.reg (now {config.reg}){where}"
        )

    def _check_finite(self, support: Support, end_loss: float = 0.0) -> None:
        finite = np.isfinite(devices.to_host(support.images)).all() and np.isfinite(devices.to_host(support.labels)).all()
        if not finite or not np.isfinite(end_loss):
            raise DivergenceError(
                f"KIP produced non-finite support images or labels: lower distill.learning_rate (now {self.config.learning_rate})"
            )

    def _check_result(self, end_loss: float, first_loss: float | None) -> None:
        self._check_finite(self.support, end_loss)
        if first_loss is not None and end_loss > first_loss:
            raise DivergenceError(
                f"KIP ended with loss {end_loss:.4g} on its first target batch, above the {first_loss:.4g} it started "
                f"from (the run diverged): lower distill.learning_rate (now {self.config.learning_rate})"
            )

    # --- checkpoints ------------------------------------------------------------------------------

    def _tree(self):
        return (self.support, self.opt_state) + ((self.best[2],) if self.config.keep == "best_validation" else ())

    def _save(self, step: int) -> None:
        """Written by one process (distributed.is_main), read by all of them to resume."""
        leaves = jax.tree_util.tree_leaves(self._tree())
        arrays = {f"leaf_{i:03d}": devices.to_host(leaf) for i, leaf in enumerate(leaves)}  # on every process: may gather
        if not distributed.is_main():
            return
        meta = {"kind": CHECKPOINT_KIND, "key": self.key, "step": step, "history": self.history}
        if self.best is not None:
            meta.update(best_accuracy=self.best[0], best_step=self.best[1])
        arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
        atomic.save_npz(self.checkpoint, arrays)

    def _resume(self) -> int:
        """Restore the state of a checkpoint of this run's key; the step to go on from (0: none).

        Only our own checkpoints are ever replaced: a file at the path that is not one (a Parquet
        file given by mistake, a damaged file) stops the run, because the next save would overwrite it.
        """
        path = self.checkpoint
        if not path.exists() and not path.is_symlink():
            return 0
        meta, leaves = read_checkpoint(path)
        if meta.get("key") != self.key:
            tqdm.write(f"kip: checkpoint {path} belongs to other params or code; starting from step 0", file=sys.stderr)
            return 0
        if self.config.keep == "best_validation":
            self.best = (0.0, 0, self.support)  # a template; the checkpoint's values replace it
        template, treedef = jax.tree_util.tree_flatten(self._tree())
        if len(leaves) != len(template) or any(leaf.shape != t.shape for leaf, t in zip(leaves, template)):
            raise UserError(f"--checkpoint {path} matches this run's key but not its shapes; delete it to start afresh")
        restored = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf, dtype=t.dtype) for leaf, t in zip(leaves, template)])
        self.support, self.opt_state = restored[:2]
        if self.config.keep == "best_validation":
            self.best = (meta["best_accuracy"], meta["best_step"], restored[2])
        self.history = list(meta["history"])
        tqdm.write(f"kip: resuming from {path} at step {meta['step']}", file=sys.stderr)
        return int(meta["step"])


def _key(checkpoint_key: str, kernel: KipKernel, config: DistillConfig, shape: tuple[int, ...], start) -> str:
    """A checkpoint resumes only into the run that wrote it: the caller's key (data, code, machine:
    `workflow.checkpoint_key`) plus the kernel, the settings, the data's shape and the start."""
    digest = hashlib.sha256(checkpoint_key.encode())
    digest.update(json.dumps({"kernel": kernel.settings, "config": asdict(config), "shape": list(shape)},
                             sort_keys=True, default=str).encode())
    for array in start or ():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def label_solve(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    kernel_fn: KernelFn,
    config: DistillConfig,
    block_size: int = 1000,
) -> KipResult:
    """Label Solve (KIP paper, Sec. 3): keep the initial support images, solve for the labels
    that make KRR on them fit the *whole* training set best. One kernel pass, no iterations; the
    sums over training images are accumulated block by block, so memory is one block's kernel.

    Kernels are computed in float64 when `config.float64`; the sums and the solve always are.
    kernel_fn: one fixed kernel function (a FixedKernel's too); a kernel drawn afresh every step has
    no single kernel to solve for, so it is refused (conv_rf solves under its fixed evaluation draw).
    """
    if isinstance(kernel_fn, FixedKernel):
        kernel_fn = kernel_fn.kernel_fn
    elif hasattr(kernel_fn, "draw"):
        raise UserError(f"Label Solve needs one fixed kernel; {kernel_fn.settings.get('name', 'this kernel')} draws "
                        "its kernel afresh every step: expected a kernel function (kernels.make)")
    images, classes = init_support(x_train, y_train, num_classes, config)
    dtype = np.float64 if config.float64 else np.float32
    targets = krr.centered_one_hot(y_train, num_classes).astype(np.float64)
    gram = np.zeros((len(images), len(images)))
    rhs = np.zeros((len(images), num_classes))
    with enable_x64(config.float64):
        for rows, k_block in kernels.kernel_rows(kernel_fn, x_train.astype(dtype), images.astype(dtype), block_size):
            k_block = k_block.astype(np.float64)
            gram += k_block.T @ k_block
            rhs += k_block.T @ targets[rows]
        k_ss = kernels.support_matrix(kernel_fn, images.astype(dtype))
    with enable_x64():
        k_ss = jnp.asarray(k_ss, jnp.float64)
        labels = np.asarray(krr.label_solve_from_moments(k_ss, jnp.asarray(gram), jnp.asarray(rhs), config.reg), np.float32)
    if not np.isfinite(labels).all():
        raise UserError(
            f"Label Solve gave non-finite labels: the {len(images)}x{len(images)} support kernel is singular "
            f"(duplicate images?) with distill.reg={config.reg}; raise distill.reg (e.g. to {max(config.reg * 100, 1e-6):g})"
        )
    return KipResult(images=images, labels=labels, classes=np.asarray(classes), initial_images=images, history=[])


CHECKPOINT_KIND = "kip-checkpoint"


def read_checkpoint(path: Path) -> tuple[dict, list[np.ndarray]]:
    """The metadata and leaves of one of our checkpoints; a UserError for anything that is not one."""
    not_ours = (
        f"--checkpoint {path} exists and is not a kip checkpoint; it would be overwritten: "
        "choose another checkpoint path, or delete the file if it is a damaged checkpoint"
    )
    if path.is_symlink() or not path.is_file() or not zipfile.is_zipfile(path):
        raise UserError(not_ours)
    try:
        data = safe_read.read_npz(path, strings=True)  # bounded: a foreign file may be hostile
        meta = json.loads(str(data.get("meta", "")))
    except (UserError, ValueError):  # unreadable, or no JSON: whatever it is, it is not safe to overwrite
        raise UserError(not_ours) from None
    count = len(data) - 1
    if not isinstance(meta, dict) or sorted(data) != sorted(["meta", *(f"leaf_{i:03d}" for i in range(count))]):
        raise UserError(not_ours)
    leaves = [data[f"leaf_{i:03d}"] for i in range(count)]
    if meta.get("kind", CHECKPOINT_KIND) not in (CHECKPOINT_KIND, "conv-kip-checkpoint") or "key" not in meta \
            or "step" not in meta:
        raise UserError(not_ours)
    return meta, leaves
