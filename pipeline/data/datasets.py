"""Datasets as plain arrays plus the metadata needed to trace them.

Every source returns uint8-or-float images in NHWC and integer labels; `load_dataset` turns them
into one `Dataset` with float32 pixels in [0, 1] and a fingerprint (sha256 of the arrays), so
lineage does not depend on where the bytes came from.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sources import RawSplits
from pipeline.errors import UserError
from pipeline.run.config import DataConfig


def default_cache_dir() -> Path:
    """$KIP_CACHE_DIR, else ~/.cache/kip-pipeline: where registry downloads are kept."""
    return Path(os.environ.get("KIP_CACHE_DIR") or Path.home() / ".cache" / "kip-pipeline")


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    origin: str
    fingerprint: str = field(default="")
    details: dict[str, Any] | None = None  # image sources: decode report and test split (RawSplits.details)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict[str, object]:
        details = {} if self.details is None else dict(self.details)
        return {**details,
            "name": self.name,
            "source": self.source,
            "origin": self.origin,
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "train_size": int(len(self.y_train)),
            "test_size": int(len(self.y_test)),
        }


def load_dataset(config: DataConfig, cache_dir: Path) -> Dataset:
    """Load `config.name` from `config.source`; downloads (registry) and decoded images (imagefolder,
    parquet) are cached in cache_dir."""
    if config.source == "embedded":
        from pipeline.data.sources import embedded

        raw = embedded.load(config.name)
    elif config.source == "registry":
        from pipeline.data.sources import registry

        raw = registry.load(config.name, Path(cache_dir))
    elif config.source == "tfds":
        from pipeline.data.sources import tfds_source

        raw = tfds_source.load(config.name, config.data_dir)
    elif config.source == "imagefolder":
        from pipeline.data.sources import imagefolder

        raw = imagefolder.load(config, Path(cache_dir))
    elif config.source == "parquet":
        from pipeline.data.sources import parquet_images

        raw = parquet_images.load(config, Path(cache_dir))
    else:
        from pipeline.data.sources import files

        raw = files.load(Path(config.data_dir or ""))
    return _finish(config, raw)


def _finish(config: DataConfig, raw: RawSplits) -> Dataset:
    validate_splits(raw)
    scale = np.float32(1.0 / raw.pixel_max)
    x_train = raw.x_train.astype(np.float32) * scale
    x_test = raw.x_test.astype(np.float32) * scale
    y_train = raw.y_train.astype(np.int32, copy=False)
    y_test = raw.y_test.astype(np.int32, copy=False)
    digest = hashlib.sha256()
    for array in (x_train, y_train, x_test, y_test):
        digest.update(np.ascontiguousarray(array))  # the buffer itself: no copy of 200 MB of pixels
    return Dataset(
        name=config.name,
        source=config.source,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=raw.class_names,
        origin=raw.origin,
        fingerprint=digest.hexdigest(),
        details=raw.details,
    )


def validate_splits(raw: RawSplits) -> None:
    """Shapes, label ranges and finiteness: the checks every source must pass."""
    num_classes = len(raw.class_names)
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.ndim != 4:
            raise UserError(f"{split} images have shape {x.shape}; expected (N, height, width, channels)")
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(
                f"{split} labels have shape {y.shape} for {len(x)} images; expected ({len(x)},)"
            )
        if len(y) == 0:
            raise UserError(f"{split} split is empty; expected at least one image")
        if not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{split} labels have dtype {y.dtype}; expected integers")
        if y.min() < 0 or y.max() >= num_classes:
            raise UserError(
                f"{split} labels span {int(y.min())}..{int(y.max())}; expected 0..{num_classes - 1}"
            )
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise UserError(f"{split} images contain NaN or Inf; expected finite pixel values")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise UserError(
            f"train images are {raw.x_train.shape[1:]} but test images are {raw.x_test.shape[1:]};"
            " expected the same shape"
        )
