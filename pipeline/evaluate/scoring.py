"""Scoring a support set: KRR test accuracy/MSE, and the random-real-subset baseline beside it.

The baseline answers the only question that matters for a distilled set: is it better than the
same number of real images picked at random (class-balanced)?

The baseline lives in the run's preprocessing. Under ZCA an FC/RBF kernel makes random real images
much weaker than under standardisation (docs/reproduction.md, "ZCA and the random baseline"), so a
ZCA run must also be held against random images under the default preprocessing.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from pipeline.compat import enable_x64

from pipeline.distill import krr
from pipeline.distill.kip import class_balanced_indices
from pipeline.errors import UserError
from pipeline.kernels import functions as kernels
from pipeline.kernels.functions import KernelFn


def krr_scores(
    kernel_fn: KernelFn,
    support_images: np.ndarray,
    support_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    reg: float,
    block_size: int = 1000,
    reg_name: str = "evaluate.reg",
) -> dict[str, float]:
    """KRR fitted on the support, scored on every test image (`krr_predictions`)."""
    predictions = krr_predictions(kernel_fn, support_images, support_labels, test_images, reg, block_size, reg_name)
    return {
        "accuracy": krr.accuracy(predictions, test_labels),
        "mse": krr.mse(predictions, krr.centered_one_hot(test_labels, num_classes)),
    }


def krr_predictions(
    kernel_fn: KernelFn,
    support_images: np.ndarray,
    support_labels: np.ndarray,
    test_images: np.ndarray,
    reg: float,
    block_size: int = 1000,
    reg_name: str = "evaluate.reg",
) -> np.ndarray:
    """KRR's float64 outputs (one row per test image, one column per class); memory is one block of K_ts.

    An image's row is computed in the block of `block_size` rows it falls in, so scoring the rows
    of one whole block alone gives the same bytes for them (tests/test_published_supports.py
    re-scores a block of the test split against the predictions a full scoring recorded).
    A support kernel too ill-conditioned to solve (duplicate images with reg 0, say) is a UserError
    naming `reg_name`, the regulariser to raise.
    """
    k_ss = kernels.support_matrix(kernel_fn, support_images)
    with enable_x64():  # the solve is tiny; do it in double precision whatever KIP used
        alpha = np.asarray(krr.fit(jnp.asarray(k_ss, jnp.float64), jnp.asarray(support_labels, jnp.float64), reg))
    if not np.isfinite(alpha).all() or not _solves(k_ss, support_labels, reg, alpha):
        raise UserError(
            f"the {len(k_ss)}x{len(k_ss)} support kernel K_ss is singular or too ill-conditioned to solve "
            f"with {reg_name}={reg}; raise {reg_name} (e.g. to {max(reg * 100, 1e-6):g})"
        )
    # K_ts is never held whole: each block of test rows is projected onto alpha and dropped. The
    # projection stays in float64: alpha ~ 1/reg has large entries of both signs that cancel.
    predictions = np.empty((len(test_images), alpha.shape[1]))
    for rows, block in kernels.kernel_rows(kernel_fn, test_images, support_images, block_size):
        predictions[rows] = block.astype(np.float64) @ alpha
    return predictions


def _solves(k_ss: np.ndarray, labels: np.ndarray, reg: float, alpha: np.ndarray) -> bool:
    """Whether alpha solves (K_ss + ridge I) alpha = y to 1e-3 of |y|: a singular K_ss gives
    Cholesky either NaN or, depending on the last bit of a pivot, a finite alpha of ~1e15 that
    solves nothing. A solvable system's relative residual is ~eps x cond(K_reg); 1e-3 admits
    every condition number below ~1e12, far beyond what evaluate.reg >= 1e-8 allows."""
    k64 = np.asarray(k_ss, np.float64)
    k_reg = k64 + (reg * np.trace(k64) / len(k64)) * np.eye(len(k64))
    labels = np.asarray(labels, np.float64)
    return bool(np.linalg.norm(k_reg @ alpha - labels) <= 1e-3 * np.linalg.norm(labels))


def random_subset_baseline(
    kernel_fn: KernelFn,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    per_class: int,
    reg: float,
    repeats: int,
    seed: int,
    block_size: int = 1000,
) -> dict[str, float]:
    """Mean and std over `repeats` class-balanced random real subsets of per_class images each."""
    accuracies, mses = [], []
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, 2, repeat])
        idx = class_balanced_indices(train_labels, per_class, num_classes, rng)
        scores = krr_scores(
            kernel_fn, train_images[idx], krr.centered_one_hot(train_labels[idx], num_classes),
            test_images, test_labels, num_classes, reg, block_size,
        )
        accuracies.append(scores["accuracy"])
        mses.append(scores["mse"])
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "mse": float(np.mean(mses)),
    }
