"""The distilled dataset on disk: one self-describing .npz per support set.

Keys `images` and `labels` follow the layout of the KIP paper's released sets, so existing
loaders work; `classes`, the fitted preprocessing (`transform/*`) and a JSON `metadata` string
make the file usable on its own: a reader can map test images into the same space and trace the
set back to its data, kernel and params. Files are written atomically and byte-reproducibly.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.errors import UserError
from pipeline.preprocess import Transform

FORMAT_VERSION = 1
_TRANSFORM_PREFIX = "transform/"


@dataclass(frozen=True)
class DistilledSet:
    images: np.ndarray  # (n, H, W, C) float32, in the transform's output space
    labels: np.ndarray  # (n, C) float32 regression targets (learned or centred one-hot)
    classes: np.ndarray  # (n,) int32 class each image was initialised from
    transform: Transform
    metadata: dict[str, Any]


def save_npz(path: Path, distilled: DistilledSet) -> None:
    arrays: dict[str, np.ndarray] = {
        "images": np.asarray(distilled.images, np.float32),
        "labels": np.asarray(distilled.labels, np.float32),
        "classes": np.asarray(distilled.classes, np.int32),
        "metadata": np.array(json.dumps({"format_version": FORMAT_VERSION, **distilled.metadata}, sort_keys=True)),
    }
    for key, value in distilled.transform.to_arrays().items():
        arrays[_TRANSFORM_PREFIX + key] = value
    atomic.save_npz(Path(path), arrays)


def load_npz(path: Path) -> DistilledSet:
    """Read and check a distilled .npz; any defect is a one-line UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; expected a distilled .npz written by `kip distill`")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file (not a zip archive: another format, or truncated)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"{path} is not a readable .npz file (corrupted or truncated: {err})") from None
    missing = [k for k in ("images", "labels", "classes", "metadata") if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; expected a distilled .npz written by `kip distill`")
    try:
        metadata = json.loads(str(arrays["metadata"]))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: metadata is not valid JSON ({err})") from None
    stored = {k[len(_TRANSFORM_PREFIX):]: v for k, v in arrays.items() if k.startswith(_TRANSFORM_PREFIX)}
    missing = sorted(set(Transform.ARRAY_KEYS) - set(stored))
    if missing:
        raise UserError(f"{path} lacks {_TRANSFORM_PREFIX}{missing[0]}; expected the preprocessing stored by `kip distill`")
    distilled = DistilledSet(
        arrays["images"], arrays["labels"], arrays["classes"], Transform.from_arrays(stored), metadata
    )
    check_consistent(path, distilled)
    return distilled


def check_consistent(path: Path, distilled: DistilledSet) -> None:
    n = len(distilled.images)
    if distilled.images.ndim != 4:
        raise UserError(f"{path}: images have shape {distilled.images.shape}; expected (n, H, W, C)")
    if distilled.labels.shape[0] != n or distilled.classes.shape != (n,):
        raise UserError(
            f"{path}: {n} images but labels {distilled.labels.shape} and classes {distilled.classes.shape}"
        )
    if not (np.isfinite(distilled.images).all() and np.isfinite(distilled.labels).all()):
        raise UserError(f"{path}: images or labels contain NaN/Inf")
