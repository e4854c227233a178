"""The validation split: held-out training images for choosing settings and monitoring runs.

The test split is touched once, for the reported number. Everything that chooses (learning rates,
steps, label modes, network losses) or watches a run (learning curves) looks at a validation split
instead: a class-balanced subset of the *training* split, fixed by the seed, that is never a KIP
target, never a support image and never a random-baseline image. Its indices are recorded in the
artifact's metadata (as a digest and a count) so anyone can rebuild it.
"""
from __future__ import annotations

import hashlib

import numpy as np

from pipeline.errors import UserError


# Independent random streams of one seed: the validation split, and the test split that an image source
# without one carves off first (`carved_test_indices`).
_VALIDATION_STREAM, _TEST_STREAM = 7, 11


def validation_indices(labels: np.ndarray, num_classes: int, size: int, seed: int) -> np.ndarray:
    """`size` training indices, class-balanced (size // num_classes per class), sorted.

    A pure function of (labels, num_classes, size, seed): the same split on every machine.
    """
    return _balanced(labels, num_classes, size, seed, _VALIDATION_STREAM, "data.validation_size")


def carved_test_indices(labels: np.ndarray, num_classes: int, size: int, seed: int) -> np.ndarray:
    """The test split carved from a dataset that has none: like `validation_indices`, another stream."""
    return _balanced(labels, num_classes, size, seed, _TEST_STREAM, "data.test_size")


def _balanced(labels: np.ndarray, num_classes: int, size: int, seed: int, stream: int, param: str) -> np.ndarray:
    if size == 0:
        return np.zeros(0, np.int64)
    per_class = size // num_classes
    if per_class == 0:
        raise UserError(f"{param}={size} is too small; expected 0 or at least {num_classes} (one per class)")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts <= per_class).any():
        c = int(np.argmin(counts))
        raise UserError(
            f"{param}={size} takes {per_class} images of class {c}, which has {int(counts[c])}; "
            "expected a split that leaves training images in every class"
        )
    rng = np.random.default_rng([seed, stream])
    chosen = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def split_digest(indices: np.ndarray) -> str:
    """sha256 of the indices as little-endian int64: how metadata names a split without listing it."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()
