"""Kernel Inducing Points (Nguyen, Chen, Lee, ICLR 2021, arXiv 2011.00050).

KIP learns a support set (x_s, y_s) so that kernel ridge regression fitted on it predicts a
target batch (x_t, y_t) well:

    loss = 0.5 * mean((y_t - K_ts (K_ss + ridge I)^-1 y_s)^2)

with gradients through the kernel into the support pixels (and into y_s when labels are learned),
optimised with Adam. Target batches are drawn class-balanced from the training split at each step.

The loop is resumable: the target batch of step t is a function of (seed, t) alone, and the
checkpoint holds the support, the labels and the full Adam state, so a resumed run is
bit-for-bit the run that was not interrupted.
"""
from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import enable_x64
from tqdm.auto import tqdm

from pipeline import atomic, devices, distributed, kernels, krr, safe_read
from pipeline.config import DistillConfig
from pipeline.errors import UserError
from pipeline.kernels import KernelFn

Monitor = Callable[[np.ndarray, np.ndarray], dict[str, float]]


class DivergenceError(UserError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


class Support(NamedTuple):
    images: jax.Array  # (n_s, H, W, C)
    labels: jax.Array  # (n_s, C) regression targets


@dataclass
class KipResult:
    images: np.ndarray
    labels: np.ndarray  # (n_s, C) final (possibly learned) label vectors
    classes: np.ndarray  # (n_s,) class each support image was initialised from
    initial_images: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)


def kip_loss(
    kernel_fn: KernelFn,
    reg: float,
    support: Support,
    x_t: jax.Array,
    y_t: jax.Array,
    kernel_block: int | None = None,
) -> jax.Array:
    """The KIP objective for one target batch.

    kernel_block: the most kernel entries (targets x support images) one K_ts block may hold. A
    larger batch is summed block by block with the blocks' forward pass recomputed in the backward
    one (jax.checkpoint), so memory is O(kernel_block) for any batch, at the price of one more K_ts
    per extra block: blocking only pays when the kernel would not fit, hence a budget in entries
    rather than in targets (at 100 support images, 20,000 targets are 8 MB of kernel).
    """
    k_ss = kernels.self_kernel(kernel_fn, support.images, symmetric_use=True)  # krr.fit's gradient is symmetric
    alpha = krr.fit(k_ss, support.labels, reg)

    def squared_error(x_block, y_block):
        k_ts = kernel_fn(devices.shard_rows(x_block), support.images)
        return jnp.sum((krr.predict(k_ts, alpha) - y_block) ** 2, axis=1)

    n_t = x_t.shape[0]
    most_targets = max(1, kernel_block // support.images.shape[0]) if kernel_block else n_t
    if n_t <= most_targets:
        return 0.5 * jnp.mean(squared_error(x_t, y_t)) / y_t.shape[1]
    blocks = -(-n_t // most_targets)
    target_block = -(-n_t // blocks)  # equal blocks: at most blocks - 1 padded rows, not a block's worth
    pad = blocks * target_block - n_t
    weight = jnp.concatenate([jnp.ones(n_t, y_t.dtype), jnp.zeros(pad, y_t.dtype)])
    x_pad, y_pad = x_t, y_t
    if pad:  # copies of a real row keep the padding finite; their weight is 0
        x_pad = jnp.concatenate([x_t, jnp.repeat(x_t[:1], pad, axis=0)])
        y_pad = jnp.concatenate([y_t, jnp.repeat(y_t[:1], pad, axis=0)])
    block_error = jax.checkpoint(lambda x, y, w: jnp.sum(w * squared_error(x, y)))

    def add_block(total, block):
        return total + block_error(*block), None

    shaped = (
        x_pad.reshape((blocks, target_block) + x_t.shape[1:]),
        y_pad.reshape(blocks, target_block, y_t.shape[1]),
        weight.reshape(blocks, target_block),
    )
    total, _ = jax.lax.scan(add_block, jnp.zeros((), y_t.dtype), shaped)
    return 0.5 * total / (n_t * y_t.shape[1])


def make_step(
    kernel_fn: KernelFn,
    optimizer: optax.GradientTransformation,
    reg: float,
    learn_labels: bool,
    frozen: np.ndarray | None = None,
    kernel_block: int | None = None,
):
    """One jitted KIP update: gather the target batch, value-and-grad, Adam.

    The target batch is split by rows across all devices (`devices`); everything else is
    replicated. Shapes never change between steps, so the step compiles once.
    frozen: boolean mask over the support pixels that must never change (corruption). Their
    gradient is zeroed before Adam, so Adam's moments, and hence their updates, stay exactly 0.
    """
    frozen_mask = None if frozen is None or not frozen.any() else jnp.asarray(frozen)

    def loss_fn(support: Support, x_t, y_t):
        if not learn_labels:
            support = support._replace(labels=jax.lax.stop_gradient(support.labels))
        return kip_loss(kernel_fn, reg, support, x_t, y_t, kernel_block)

    @jax.jit
    def step(support: Support, opt_state, x_train, y_train, target_idx):
        x_t = devices.shard_rows(jnp.take(x_train, target_idx, axis=0))
        y_t = devices.shard_rows(jnp.take(y_train, target_idx, axis=0))
        loss, grads = jax.value_and_grad(loss_fn)(support, x_t, y_t)
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
    mask = corruption_mask(shape, config)
    if mask.any():
        noise_rng = np.random.default_rng([config.seed, 6])
        noise = noise_rng.standard_normal(shape) * x_train.std() + x_train.mean()
        images = np.where(mask, noise, images)
    return np.asarray(images, np.float32), classes


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


def distill(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    kernel_fn: KernelFn,
    config: DistillConfig,
    *,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    monitor: Monitor | None = None,
    progress: bool = True,
) -> KipResult:
    """Run KIP on preprocessed training images (NHWC) with integer labels.

    checkpoint: where to save (every `config.checkpoint_every` steps) and resume from. A checkpoint
    whose `checkpoint_key` differs (other data, kernel or params) is ignored and overwritten.
    monitor: called before the first step and every `config.eval_every` steps with (images, labels);
        its numbers join the history (the step-0 record has no loss).
    """
    if config.support_per_class * num_classes > len(y_train):
        raise UserError(
            f"distill.support_per_class={config.support_per_class} needs "
            f"{config.support_per_class * num_classes} training images; the training split has {len(y_train)} (without the validation split)"
        )
    with enable_x64(config.float64):
        return _distill(x_train, y_train, num_classes, kernel_fn, config, checkpoint, checkpoint_key, monitor, progress)


def _distill(x_train, y_train, num_classes, kernel_fn, config, checkpoint, checkpoint_key, monitor, progress):
    dtype = jnp.float64 if config.float64 else jnp.float32
    init_images, classes = init_support(x_train, y_train, num_classes, config)
    init_labels = krr.centered_one_hot(classes, num_classes)
    optimizer = optax.adam(learning_rate_schedule(config.lr_schedule, config.learning_rate, config.steps))
    support = Support(jnp.asarray(init_images, dtype), jnp.asarray(init_labels, dtype))
    opt_state = optimizer.init(support)
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint is not None:
        restored = _load_checkpoint(checkpoint, checkpoint_key, support, opt_state)
        if restored is not None:
            support, opt_state, start, history = restored
        # Process 0 writes the checkpoint; each process reads it. They must start from the same step.
        distributed.same_on_every_process(start, "the step the checkpoint resumes from")
    support, opt_state = devices.replicate_tree((support, opt_state))

    if monitor is not None and config.eval_every and start == 0:
        # The starting point of the learning curve: how good the initial support already is.
        history.append({"step": 0, **monitor(devices.to_host(support.images), devices.to_host(support.labels))})
    frozen = corruption_mask(init_images.shape, config)
    step_fn = make_step(kernel_fn, optimizer, config.reg, config.learn_labels, frozen, config.kernel_block)
    x_dev = devices.put_replicated(np.asarray(x_train, dtype))
    y_dev = devices.put_replicated(np.asarray(krr.centered_one_hot(y_train, num_classes), dtype))
    last_saved = start
    first_loss = next((h["loss"] for h in history if "loss" in h), None)
    with tqdm(total=config.steps, initial=start, desc="KIP", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(start, config.steps):
            idx = target_indices(y_train, num_classes, config.target_batch, config.seed, step)
            new_support, new_opt_state, loss = step_fn(support, opt_state, x_dev, y_dev, idx)
            loss = float(devices.to_host(loss))
            first_loss = loss if first_loss is None else first_loss
            _check_loss(loss, first_loss, step, config, checkpoint if last_saved else None, last_saved)
            support, opt_state = new_support, new_opt_state
            record: dict[str, float] = {"step": step + 1, "loss": loss}
            done = step + 1
            if monitor is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                record.update(monitor(devices.to_host(support.images), devices.to_host(support.labels)))
            history.append(record)
            bar.update(1)
            if done % 10 == 0 or done == config.steps:
                bar.set_postfix(loss=f"{loss:.4g}")
            if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                _check_finite(support, config)  # never let a checkpoint hold a diverged support
                _save_checkpoint(checkpoint, checkpoint_key, support, opt_state, done, history)
                last_saved = done
    # The run's verdict on its own result: the final support, scored on the first step's target
    # batch, must be finite and no worse than the support it started from on that same batch.
    # (A step's loss is taken before its update, so the last update is otherwise never checked.)
    first_batch = target_indices(y_train, num_classes, config.target_batch, config.seed, 0)
    _, _, end_loss = step_fn(support, opt_state, x_dev, y_dev, first_batch)
    _check_result(float(devices.to_host(end_loss)), first_loss, support, config)
    return KipResult(
        images=devices.to_host(support.images).astype(np.float32),
        labels=devices.to_host(support.labels).astype(np.float32),
        classes=np.asarray(classes),
        initial_images=init_images,
        history=history,
    )


BLOWUP_FACTOR = 10.0  # a step loss this many times the first one means the run has diverged


def _check_loss(loss: float, first_loss: float, step: int, config: DistillConfig, checkpoint: Path | None, saved: int) -> None:
    """Stop before a diverged state is kept: a non-finite loss, or one BLOWUP_FACTOR x the first."""
    if np.isfinite(loss) and (loss <= BLOWUP_FACTOR * first_loss or first_loss == 0):
        return
    what = f"became {loss}" if not np.isfinite(loss) else f"rose to {loss:.4g}, over {BLOWUP_FACTOR:g}x its first {first_loss:.4g},"
    where = f"; last good checkpoint: {checkpoint} (step {saved})" if checkpoint else ""
    raise DivergenceError(
        f"KIP loss {what} at step {step + 1}: lower distill.learning_rate (now {config.learning_rate})"
        f" or raise distill.reg (now {config.reg}){where}"
    )


def _check_finite(support: Support, config: DistillConfig, end_loss: float = 0.0) -> None:
    finite = np.isfinite(devices.to_host(support.images)).all() and np.isfinite(devices.to_host(support.labels)).all()
    if not finite or not np.isfinite(end_loss):
        raise DivergenceError(
            f"KIP produced non-finite support images or labels: lower distill.learning_rate (now {config.learning_rate})"
        )


def _check_result(end_loss: float, first_loss: float | None, support: Support, config: DistillConfig) -> None:
    _check_finite(support, config, end_loss)
    if first_loss is not None and end_loss > first_loss:
        raise DivergenceError(
            f"KIP ended with loss {end_loss:.4g} on its first target batch, above the {first_loss:.4g} it started "
            f"from (the run diverged): lower distill.learning_rate (now {config.learning_rate})"
        )


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
    """
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


_CHECKPOINT_KIND = "kip-checkpoint"
# Checkpoints this project writes, whichever loop wrote them: one of another loop or of other
# params is replaced (a `dvc exp run -S kernel.architecture=...` switches loops on the same path).
CHECKPOINT_KINDS = (_CHECKPOINT_KIND, "conv-kip-checkpoint")


def _save_checkpoint(path: Path, key: str, support: Support, opt_state, step: int, history) -> None:
    """Written by one process (distributed.is_main), read by all of them to resume."""
    leaves = jax.tree_util.tree_leaves((support, opt_state))
    arrays = {f"leaf_{i:03d}": devices.to_host(leaf) for i, leaf in enumerate(leaves)}  # on every process: may gather
    if not distributed.is_main():
        return
    meta = {"kind": _CHECKPOINT_KIND, "key": key, "step": step, "history": history}
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
    atomic.save_npz(Path(path), arrays)


def _load_checkpoint(path: Path, key: str, support: Support, opt_state):
    """(support, opt_state, step, history) from `path`, or None if absent or for other params.

    Only our own checkpoints are ever replaced: a file at `path` that is not one (a Parquet file
    given by mistake, a damaged file) stops the run, because the next save would overwrite it.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    meta, leaves = read_checkpoint(path)
    if meta.get("kind", _CHECKPOINT_KIND) != _CHECKPOINT_KIND or meta.get("key") != key:
        tqdm.write(f"kip: checkpoint {path} belongs to other params or code; starting from step 0", file=sys.stderr)
        return None
    template, treedef = jax.tree_util.tree_flatten((support, opt_state))
    if len(leaves) != len(template) or any(leaf.shape != t.shape for leaf, t in zip(leaves, template)):
        raise UserError(f"--checkpoint {path} matches this run's key but not its shapes; delete it to start afresh")
    restored = [jnp.asarray(leaf, dtype=t.dtype) for leaf, t in zip(leaves, template)]
    support, opt_state = jax.tree_util.tree_unflatten(treedef, restored)
    tqdm.write(f"kip: resuming from {path} at step {meta['step']}", file=sys.stderr)
    return support, opt_state, int(meta["step"]), list(meta["history"])


def read_checkpoint(path: Path) -> tuple[dict, list[np.ndarray]]:
    """The metadata and leaves of a checkpoint (any of CHECKPOINT_KINDS); a UserError for anything
    that is not one of ours."""
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
    if meta.get("kind", _CHECKPOINT_KIND) not in CHECKPOINT_KINDS or "key" not in meta or "step" not in meta:
        raise UserError(not_ours)
    return meta, leaves
