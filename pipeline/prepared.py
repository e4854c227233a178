"""The prepare step: a dataset mapped into the space the kernel sees, with its transform.

`prepare` loads a dataset and fits the preprocessing on its training split; `reprepare` rebuilds
the same view for a distilled set from the transform stored in it. `save`/`load` keep a Prepared
as one .npz (the prepare stage's output), written atomically and byte-reproducibly.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, preprocess, safe_read
from pipeline.artifacts import DistilledSet
from pipeline.config import DataConfig, PreprocessConfig
from pipeline.data import Dataset, load_dataset
from pipeline.errors import UserError
from pipeline.preprocess import Transform

_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# Per array, 4x the cap on raw data-source arrays (safe_read.MAX_ARRAY_BYTES, 256 MiB): x_train and
# x_test are float32 copies of source arrays, 4 bytes per uint8 pixel, so a source array at its cap
# becomes 1 GiB here. The ZCA matrix (float64, d x d) stays under it up to d = 11585 (about
# 62x62x3 images), beyond which fitting it is impractical anyway. pipeline.artifacts.MAX_ARRAY_BYTES
# must stay equal: a distilled set stores this same ZCA matrix.
MAX_ARRAY_BYTES = 4 * safe_read.MAX_ARRAY_BYTES


@dataclass(frozen=True)
class Prepared:
    """A dataset in the space the kernel sees, with the transform that put it there."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    transform: Transform
    provenance: dict[str, Any]  # {"data": ..., "preprocess": ..., "dataset": Dataset.describe()}

    @property
    def num_classes(self) -> int:
        return len(self.provenance["dataset"]["class_names"])

    @property
    def class_names(self) -> list[str]:
        return list(self.provenance["dataset"]["class_names"])


def prepare(data: DataConfig, prep: PreprocessConfig, *, cache_dir: Path) -> Prepared:
    dataset = load_dataset(data, cache_dir)
    transform = preprocess.fit(prep, dataset.x_train)
    return _through(dataset, transform, {"data": asdict(data), "preprocess": asdict(prep), "dataset": dataset.describe()})


def reprepare(distilled: DistilledSet, *, cache_dir: Path) -> Prepared:
    """The data a support set was distilled from, mapped through the transform stored with it."""
    data = DataConfig(**distilled.metadata["data"])
    dataset = load_dataset(data, cache_dir)
    expected = distilled.metadata["dataset"]["fingerprint"]
    if dataset.fingerprint != expected:
        raise UserError(
            f"dataset {data.source}:{data.name} has fingerprint {dataset.fingerprint[:12]}, but the support set was "
            f"distilled from {expected[:12]}; expected the same data"
        )
    return _through(dataset, distilled.transform, {k: distilled.metadata[k] for k in ("data", "preprocess", "dataset")})


def _through(dataset: Dataset, transform: Transform, provenance: dict[str, Any]) -> Prepared:
    return Prepared(
        x_train=transform.apply(dataset.x_train),
        y_train=dataset.y_train,
        x_test=transform.apply(dataset.x_test),
        y_test=dataset.y_test,
        transform=transform,
        provenance=provenance,
    )


def save(path: Path, prepared: Prepared) -> None:
    """Write atomically and byte-reproducibly; refuses NaN/Infinity in any array or the provenance."""
    path = Path(path)
    arrays = {key: getattr(prepared, key) for key in _ARRAYS}
    arrays.update({f"transform/{k}": v for k, v in prepared.transform.to_arrays().items()})
    atomic.check_finite_arrays(path, arrays)
    arrays["provenance"] = np.array(atomic.finite_json(prepared.provenance, f"{path}: provenance", sort_keys=True))
    atomic.save_npz(path, arrays)


def load(path: Path) -> Prepared:
    """Read the prepare stage's output; any defect is a one-line UserError naming the file."""
    path = Path(path)
    safe_read.check_regular(path, "the output of the prepare stage (dvc repro prepare)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file (not a zip archive: another format, or truncated)")
    arrays = safe_read.read_npz(path, max_array_bytes=MAX_ARRAY_BYTES, strings=True)  # provenance is a string
    missing = [k for k in (*_ARRAYS, "provenance", *(f"transform/{k}" for k in Transform.ARRAY_KEYS)) if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {missing[0]}; expected the output of the prepare stage")
    try:
        provenance = json.loads(str(arrays["provenance"]))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: provenance is not valid JSON ({safe_read.one_line(err)})") from None
    transform = Transform.from_arrays({k[len("transform/"):]: v for k, v in arrays.items() if k.startswith("transform/")})
    return Prepared(
        **{key: arrays[key] for key in _ARRAYS},
        transform=transform,
        provenance=provenance,
    )
