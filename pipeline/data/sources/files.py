"""A directory of MNIST-style IDX files (raw or .gz) or of train.npz / test.npz.

IDX: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte (each optionally .gz). NPZ: train.npz and test.npz with arrays
`x` (N, H, W[, C]) and `y` (N,) (`images`/`labels` also accepted). uint8 pixels are read as 0..255,
float pixels as already in [0, 1]; both splits must hold the same kind.

Files are read through `pipeline.artifacts.safe_read`: only regular files, each array at most
`safe_read.MAX_ARRAY_BYTES` (256 MiB), declared sizes checked before reading. Labels must be class
indices 0..MAX_CLASSES-1, checked before the class list is built from the largest label.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.artifacts.safe_read import read_npz
from pipeline.data.sources import RawSplits
from pipeline.data.sources.idx import read_idx
from pipeline.errors import UserError

# At most 1000 classes (ImageNet-1k's count). KIP's support set holds support_per_class images of
# every class and its kernel matrices grow with the square of that, so 1000 classes x 10 images is
# already a 10k x 10k kernel; a larger label is a damaged file, not a dataset KIP can distil.
MAX_CLASSES = 1000

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_FILES = {"train": "train.npz", "test": "test.npz"}


def load(directory: Path) -> RawSplits:
    if not directory.is_dir():
        raise UserError(f"data.data_dir={str(directory)!r} is not a directory; expected a folder of IDX or .npz files")
    if all((directory / name).exists() for name in NPZ_FILES.values()):
        arrays, origins = _load_npz(directory)
    else:
        arrays, origins = _load_idx(directory)
    for key in ("x_train", "x_test"):
        if arrays[key].ndim == 3:
            arrays[key] = arrays[key][..., None]
    x_train = arrays["x_train"]
    for key in ("x_train", "x_test"):  # both splits are scaled by the training images' pixel_max
        dtype = arrays[key].dtype
        if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
            raise UserError(f"images in {origins[key]} have dtype {dtype}; expected uint8 or float")
    if (arrays["x_test"].dtype == np.uint8) != (x_train.dtype == np.uint8):
        raise UserError(f"images in {origins['x_test']} have dtype {arrays['x_test'].dtype} but those in "
                        f"{origins['x_train']} {x_train.dtype}; expected uint8 (0..255) or float (0..1) in both")
    pixel_max = 255.0 if x_train.dtype == np.uint8 else 1.0
    num_classes = max(_check_labels(arrays[key], origins[key]) for key in ("y_train", "y_test")) + 1
    return RawSplits(
        x_train=x_train,
        y_train=arrays["y_train"].astype(np.int32),  # checked 0..MAX_CLASSES-1; int32 is what the pipeline uses
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.int32),
        pixel_max=pixel_max,
        class_names=tuple(str(c) for c in range(num_classes)),
        origin=f"files:{directory.resolve()}",
    )


def _check_labels(labels: np.ndarray, origin: str) -> int:
    """The largest label, after checking all are class indices 0..MAX_CLASSES-1."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels in {origin} have dtype {labels.dtype}; expected integer labels")
    if labels.size == 0:
        return -1
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= MAX_CLASSES:
        bad = low if low < 0 else high
        raise UserError(
            f"{origin} holds label {bad}; expected class indices 0..{MAX_CLASSES - 1} (at most {MAX_CLASSES} classes)"
        )
    return high


def _load_idx(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four IDX arrays, and the file each came from (for error messages)."""
    arrays, origins = {}, {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if os.path.lexists(p)), None)
        if path is None:
            expected = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
            raise UserError(
                f"data.data_dir={str(directory)!r} lacks {stem}[.gz]; expected either {expected}, "
                f"or {' and '.join(NPZ_FILES.values())}"
            )
        arrays[key], origins[key] = read_idx(path), str(path)
    return arrays, origins


def _load_npz(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """x/y (or images/labels) of train.npz and test.npz, and the file each came from."""
    arrays, origins = {}, {}
    for split, filename in NPZ_FILES.items():
        path = directory / filename
        found = read_npz(path, lambda names: _pick_xy(names, path))
        x_key, y_key = _pick_xy(sorted(found), path)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = found[x_key], found[y_key]
        origins[f"x_{split}"] = origins[f"y_{split}"] = str(path)
    return arrays, origins


def _pick_xy(names: list[str], path: Path) -> tuple[str, str]:
    x_key = "x" if "x" in names else "images"
    y_key = "y" if "y" in names else "labels"
    if x_key not in names or y_key not in names:
        raise UserError(f"{path} has arrays {names}; expected x and y (or images and labels)")
    return x_key, y_key
