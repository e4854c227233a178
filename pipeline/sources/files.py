"""A directory of MNIST-style IDX files (raw or .gz) or of train.npz / test.npz.

IDX: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte (each optionally .gz). NPZ: train.npz and test.npz with arrays
`x` (N, H, W[, C]) and `y` (N,) (`images`/`labels` also accepted). uint8 pixels are read as 0..255,
float pixels as already in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import RawSplits
from pipeline.errors import UserError
from pipeline.sources.idx import parse_idx

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
        arrays = _load_npz(directory)
    else:
        arrays = _load_idx(directory)
    for key in ("x_train", "x_test"):
        if arrays[key].ndim == 3:
            arrays[key] = arrays[key][..., None]
    x_train = arrays["x_train"]
    if x_train.dtype == np.uint8:
        pixel_max = 255.0
    elif np.issubdtype(x_train.dtype, np.floating):
        pixel_max = 1.0
    else:
        raise UserError(f"images in {directory} have dtype {x_train.dtype}; expected uint8 or float")
    for key in ("y_train", "y_test"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise UserError(f"{key} in {directory} has dtype {arrays[key].dtype}; expected integer labels")
    num_classes = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1
    return RawSplits(
        x_train=x_train,
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.int64),
        pixel_max=pixel_max,
        class_names=tuple(str(c) for c in range(num_classes)),
        origin=f"files:{directory.resolve()}",
    )


def _load_idx(directory: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            expected = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
            raise UserError(
                f"data.data_dir={str(directory)!r} lacks {stem}[.gz]; expected either {expected}, "
                f"or {' and '.join(NPZ_FILES.values())}"
            )
        arrays[key] = parse_idx(path.read_bytes(), str(path))
    return arrays


def _load_npz(directory: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split, filename in NPZ_FILES.items():
        path = directory / filename
        try:
            with np.load(path, allow_pickle=False) as data:
                x_key = "x" if "x" in data.files else "images"
                y_key = "y" if "y" in data.files else "labels"
                if x_key not in data.files or y_key not in data.files:
                    raise UserError(f"{path} has arrays {sorted(data.files)}; expected x and y (or images and labels)")
                arrays[f"x_{split}"] = data[x_key]
                arrays[f"y_{split}"] = data[y_key]
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None
    return arrays
