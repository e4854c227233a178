"""The prepare step: a dataset mapped into the space the kernel sees, with its transform.

`prepare` loads a dataset, sets the validation split aside (`pipeline.data.splits`) and fits the
preprocessing on the rest of the training split; `reprepare` rebuilds the same view for a
distilled set from the transform and the split recorded in it. `save`/`load` keep a Prepared
as one .npz (the prepare stage's output), written atomically and byte-reproducibly.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic, safe_read
from pipeline.artifacts.npz import DistilledSet
from pipeline.data import preprocess, splits
from pipeline.data.datasets import Dataset, load_dataset
from pipeline.data.preprocess import Transform
from pipeline.errors import UserError
from pipeline.run.config import DataConfig, PreprocessConfig

_ARRAYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
# Per array, 4x the cap on raw data-source arrays (safe_read.MAX_ARRAY_BYTES, 256 MiB): x_train and
# x_test are float32 copies of source arrays, 4 bytes per uint8 pixel, so a source array at its cap
# becomes 1 GiB here. The ZCA matrix (float64, d x d) stays under it up to d = 11585 (about
# 62x62x3 images), beyond which fitting it is impractical anyway. pipeline.artifacts.npz.MAX_ARRAY_BYTES
# must stay equal: a distilled set stores this same ZCA matrix.
MAX_ARRAY_BYTES = 4 * safe_read.MAX_ARRAY_BYTES


@dataclass(frozen=True)
class Prepared:
    """A dataset in the space the kernel sees, with the transform that put it there."""

    x_train: np.ndarray  # the training split without the validation images
    y_train: np.ndarray
    x_val: np.ndarray  # held-out training images: for choosing settings and monitoring
    y_val: np.ndarray
    x_test: np.ndarray  # read only for reported numbers
    y_test: np.ndarray
    transform: Transform
    provenance: dict[str, Any]  # {"data", "preprocess", "dataset": Dataset.describe(), "validation"}

    @property
    def num_classes(self) -> int:
        return len(self.provenance["dataset"]["class_names"])

    @property
    def class_names(self) -> list[str]:
        return list(self.provenance["dataset"]["class_names"])


def prepare(data: DataConfig, prep: PreprocessConfig, *, cache_dir: Path) -> Prepared:
    dataset = load_dataset(data, cache_dir)
    val = _validation(data, dataset)
    transform = preprocess.fit(prep, np.delete(dataset.x_train, val, axis=0))
    provenance = {"data": asdict(data), "preprocess": asdict(prep), "dataset": dataset.describe(),
                  "validation": _validation_record(data, val)}
    return _through(dataset, transform, val, provenance)


def reprepare(distilled: DistilledSet, *, cache_dir: Path) -> Prepared:
    """The data a support set was distilled from, split and mapped as it was when distilled."""
    data = DataConfig(**distilled.metadata["data"])
    dataset = load_dataset(data, cache_dir)
    expected = distilled.metadata["dataset"]["fingerprint"]
    if dataset.fingerprint != expected:
        raise UserError(
            f"dataset {data.source}:{data.name} has fingerprint {dataset.fingerprint[:12]}, but the support set was "
            f"distilled from {expected[:12]}; expected the same data"
        )
    val = _validation(data, dataset)
    recorded = distilled.metadata.get("validation")
    if recorded is not None and recorded != _validation_record(data, val):
        raise UserError(
            "the validation split rebuilt from the support set's metadata differs from the one it records; "
            "expected the same data.validation_fraction, seed and dataset"
        )
    provenance = {k: distilled.metadata[k] for k in ("data", "preprocess", "dataset")}
    return _through(dataset, distilled.transform, val, {**provenance, "validation": _validation_record(data, val)})


def _validation(data: DataConfig, dataset: Dataset) -> np.ndarray:
    size = int(round(data.validation_fraction * len(dataset.y_train)))
    return splits.validation_indices(dataset.y_train, dataset.num_classes, size, data.seed)


def _validation_record(data: DataConfig, val: np.ndarray) -> dict[str, Any]:
    """What metadata says of the split: enough to rebuild it and to check the rebuild."""
    return {"of": "training split", "fraction": data.validation_fraction, "seed": data.seed,
            "size": int(len(val)), "sha256": splits.split_digest(val)}


def _through(dataset: Dataset, transform: Transform, val: np.ndarray, provenance: dict[str, Any]) -> Prepared:
    keep = np.ones(len(dataset.y_train), bool)
    keep[val] = False
    return Prepared(
        x_train=transform.apply(dataset.x_train[keep]),
        y_train=dataset.y_train[keep],
        x_val=transform.apply(dataset.x_train[val]),
        y_val=dataset.y_train[val],
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


def check_same_data(distilled: DistilledSet, prepared: Prepared) -> None:
    """A set is scored only on the data it was distilled from, mapped by the preprocessing it was
    distilled under: the dataset's fingerprint and the fitted transform must both match (a
    `dvc repro -s prepare` with other preprocessing params would otherwise be scored silently)."""
    theirs = (distilled.metadata.get("dataset") or {}).get("fingerprint")
    ours = prepared.provenance["dataset"]["fingerprint"]
    if not isinstance(theirs, str):
        raise UserError("the support set records no dataset fingerprint (metadata dataset.fingerprint), so it cannot "
                        "be checked against the data it is scored on; expected the lineage `kip distill` writes")
    if theirs != ours:
        raise UserError(f"the support set was distilled from a dataset with fingerprint {theirs[:12]}; the prepared "
                        f"data's is {ours[:12]}: prepare the set's own data (`kip evaluate` does it from its lineage)")
    if distilled.transform.checksum() != prepared.transform.checksum():
        raise UserError(f"the support set was distilled under preprocessing {distilled.transform.method!r} "
                        f"(transform sha256 {distilled.transform.checksum()[:12]}); the prepared data was mapped by "
                        f"{prepared.transform.method!r} ({prepared.transform.checksum()[:12]}): re-run prepare with the "
                        "set's preprocess params, or `kip evaluate`, which re-prepares from the set's lineage")
