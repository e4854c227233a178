"""sklearn's 8x8 digits: 1797 real images that ship inside scikit-learn, so no download at all.

The images are read from scikit-learn's own data file, found without importing scikit-learn (its
import takes 1.4 s, most of a small `kip distill`'s start-up); the train/test split is the one
`train_test_split` gives, stored as indices (`digits_split`, checked against scikit-learn by
tests/test_data.py).
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from pipeline.data.sources import RawSplits, digits_split
from pipeline.errors import UserError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
DIGITS = 1797


def load(name: str) -> RawSplits:
    del name  # only "digits" exists; DataConfig has checked it
    images, labels = _read_digits()
    train, test = np.asarray(digits_split.TRAIN), np.asarray(digits_split.TEST)
    return RawSplits(
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        pixel_max=16.0,
        class_names=tuple(str(c) for c in range(10)),
        origin=f"sklearn.datasets.load_digits, stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split (seed {SPLIT_SEED})",
    )


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8, 1) with values 0..16, labels int64): load_digits' own parsing of
    sklearn/datasets/data/digits.csv.gz (64 pixel columns, then the label)."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise UserError("data.source=embedded needs scikit-learn's digits file (sklearn/datasets/data/digits.csv.gz); "
                        "install scikit-learn (pip install -c constraints.txt -e '.[full]')")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    if table.shape != (DIGITS, 65):
        raise UserError(f"{path} holds a {table.shape} table; expected ({DIGITS}, 65), the digits of scikit-learn")
    return table[:, :64].astype(np.uint8).reshape(DIGITS, 8, 8, 1), table[:, 64].astype(np.int64)
