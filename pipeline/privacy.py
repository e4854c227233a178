"""How far a support set is from the training images it was distilled from.

For each support image: the L2 distance, in the stored preprocessing space, to its nearest training
image and that image's index. The same statistic for held-out real images (a seeded sample of the
validation split: real images KIP never used as targets) is the yardstick: a support image much closer to a training
image than real images usually are is close to a copy of it. Distances come from
|q|^2 - 2 q.x + |x|^2 in float64, in blocks of training images, so memory stays at one block.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def nearest_train(
    queries: np.ndarray, x_train: np.ndarray, block: int = 4096, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest training image.

    mask (same shape as queries, boolean): compare only the True pixels of each query, so a
    corrupted support image is judged on the pixels KIP could learn, not on its frozen noise.
    """
    q = np.asarray(queries, np.float64).reshape(len(queries), -1)
    m = np.ones_like(q) if mask is None else np.asarray(mask, np.float64).reshape(q.shape)
    q = q * m
    q_norms = np.sum(q * q, axis=1)
    best = np.full(len(q), np.inf)
    where = np.zeros(len(q), np.int64)
    for start in range(0, len(x_train), block):
        x = np.asarray(x_train[start:start + block], np.float64).reshape(-1, q.shape[1])
        squared = q_norms[:, None] - 2.0 * q @ x.T + m @ (x * x).T
        local = np.argmin(squared, axis=1)
        values = squared[np.arange(len(q)), local]
        better = values < best
        best[better], where[better] = values[better], start + local[better]
    return np.sqrt(np.maximum(best, 0.0)), where


def report(
    images: np.ndarray, x_train: np.ndarray, x_heldout: np.ndarray, seed: int, learned: np.ndarray | None = None
) -> dict[str, Any]:
    """The privacy section of an artifact's metadata (JSON-ready).

    learned: boolean mask of the pixels KIP could change (False where corruption froze noise).
    With it, a `learned_pixels` part repeats the comparison on those pixels only, real images
    masked alike: whole-image distances of a corrupted support mostly measure its noise.
    """
    rng = np.random.default_rng([seed, 5])
    sample = x_heldout[rng.choice(len(x_heldout), size=min(len(images), len(x_heldout)), replace=False)]
    section = _comparison("L2 distance to the nearest training image, in the preprocessed space",
                          images, sample, x_train, mask=None)
    if learned is not None and not np.all(learned):
        section["learned_pixels"] = _comparison(
            "the same, over each support image's learnable (uncorrupted) pixels only",
            images, sample, x_train, mask=learned,
        )
    return section


def _comparison(metric: str, images: np.ndarray, sample: np.ndarray, x_train: np.ndarray,
                mask: np.ndarray | None) -> dict[str, Any]:
    """Support distances beside held-out real images' (masked alike when `mask` is given)."""
    distance, index = nearest_train(images, x_train, mask=mask)
    real, _ = nearest_train(sample, x_train, mask=None if mask is None else mask[: len(sample)])
    return {
        "metric": metric,
        "nearest_train_distance": [float(d) for d in distance],
        "nearest_train_index": [int(i) for i in index],
        "support": _summary(distance),
        "real_heldout_images": _summary(real),
        "median_ratio": float(np.median(distance) / max(np.median(real), 1e-12)),
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"count": int(len(values)), "min": float(np.min(values)), "median": float(np.median(values)),
            "mean": float(np.mean(values))}
