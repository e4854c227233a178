"""sklearn's 8x8 digits: 1797 real images that ship inside scikit-learn, so no download at all."""
from __future__ import annotations

import numpy as np

from pipeline.data import RawSplits

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load(name: str) -> RawSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    del name  # only "digits" exists; DataConfig has checked it
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # values 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return RawSplits(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        pixel_max=16.0,
        class_names=tuple(str(c) for c in range(10)),
        origin=f"sklearn.datasets.load_digits, stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split (seed {SPLIT_SEED})",
    )
