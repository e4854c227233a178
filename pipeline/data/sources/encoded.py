"""What the encoded-image sources (imagefolder, parquet) share once their images are decoded: the
decode cache, and the split into train and test.

Decoding 60,000 PNGs takes minutes; `dvc exp run` with other preprocessing or KIP params re-runs
`prepare`, so the decoded arrays are cached in $KIP_CACHE_DIR/decoded/, keyed by the sha256 of the
decode settings, the decoder's version and every input file's name and contents. A cache entry is
only ever a copy of what decoding would give: a damaged one is decoded again, never trusted.

A source without a test split has one carved off, class-balanced and chosen by `data.seed`
(`pipeline.data.splits.carved_test_indices`), and recorded in lineage like the validation split.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic, safe_read
from pipeline.data import splits
from pipeline.data.sources import RawSplits
from pipeline.data.sources.images import DECODER_VERSION, RESAMPLE
from pipeline.errors import UserError

# Every image of a dataset is held decoded in memory, as uint8: the cap on one source array.
MAX_DECODED_BYTES = safe_read.MAX_ARRAY_BYTES


@dataclass(frozen=True)
class Decoded:
    images: np.ndarray  # (N, size, size, channels) uint8
    labels: np.ndarray  # (N,) int32 class indices into class_names
    is_test: np.ndarray | None  # (N,) bool where the data names a test split; None: carve one
    class_names: tuple[str, ...]
    report: dict[str, Any]  # images.DecodeReport.as_dict()


def check_capacity(count: int, channels: int, size: int, origin: str) -> None:
    """Refuse, before allocating, a dataset whose decoded pixels would exceed MAX_DECODED_BYTES."""
    needed = count * size * size * channels
    if needed > MAX_DECODED_BYTES:
        raise UserError(
            f"{origin} holds {count} images, {needed >> 20} MiB decoded at {size}x{size}x{channels}; expected at most "
            f"{MAX_DECODED_BYTES >> 20} MiB (a smaller data.image_size, or fewer images)"
        )


def cache_key(settings: dict[str, Any], files: list[tuple[str, Path]]) -> str:
    """sha256 over the settings, the decoder version and each (name, contents) in order."""
    digest = hashlib.sha256(json.dumps({**settings, "decoder": DECODER_VERSION}, sort_keys=True).encode())
    for name, path in files:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(cache_dir: Path, source: str, key: str, produce: Callable[[], Decoded]) -> Decoded:
    """The cached decode for `key`, else `produce()` (then cached)."""
    path = Path(cache_dir) / "decoded" / f"{source}-{key[:40]}.npz"
    if path.exists():
        found = _read(path)
        if found is not None:
            return found
    decoded = produce()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": decoded.images, "labels": decoded.labels,
              "meta": np.array(json.dumps({"class_names": list(decoded.class_names), "report": decoded.report,
                                           "has_test": decoded.is_test is not None}, sort_keys=True))}
    if decoded.is_test is not None:
        arrays["is_test"] = decoded.is_test
    atomic.save_npz(path, arrays)
    return decoded


def _read(path: Path) -> Decoded | None:
    """A cache entry, or None if it is damaged in any way (it is then decoded again and replaced)."""
    try:
        arrays = safe_read.read_npz(path, max_array_bytes=MAX_DECODED_BYTES, strings=True)
        meta = json.loads(str(arrays["meta"]))
        images, labels = arrays["images"], arrays["labels"]
        is_test = arrays["is_test"] if meta["has_test"] else None
        names = tuple(str(n) for n in meta["class_names"])
        ok = (images.dtype == np.uint8 and images.ndim == 4 and labels.dtype == np.int32 and labels.shape == images.shape[:1]
              and (is_test is None or (is_test.dtype == bool and is_test.shape == labels.shape))
              and len(labels) > 0 and 0 <= labels.min() and labels.max() < len(names))
        return Decoded(images, labels, is_test, names, dict(meta["report"])) if ok else None
    except (UserError, KeyError, ValueError, TypeError, OSError):
        return None


def to_splits(decoded: Decoded, *, seed: int, test_fraction: float, origin: str, settings: dict[str, Any]) -> RawSplits:
    """Train and test arrays from the decoded images: the data's own split, else one carved by seed.
    `details` hold the decode report as it was when decoded (a cache hit reports the same counts), so
    lineage, and with it the prepared file, is the same whether or not the cache was warm."""
    num_classes = len(decoded.class_names)
    counts = np.bincount(decoded.labels, minlength=num_classes)
    details: dict[str, Any] = {"decode": {**settings, "resample": RESAMPLE, "decoder": DECODER_VERSION,
                                          **decoded.report}}
    if decoded.is_test is not None:
        test = np.flatnonzero(decoded.is_test)
        details["test_split"] = {"of": "the data's own test split", "size": int(len(test))}
    else:
        size = int(round(test_fraction * len(decoded.labels)))
        if (counts < 2).any():
            c = int(np.argmin(counts))
            raise UserError(f"class {decoded.class_names[c]!r} has {int(counts[c])} image(s) and there is no test split "
                            "to take its test images from; expected at least 2 images in every class")
        size = max(size, num_classes)
        test = splits.carved_test_indices(decoded.labels, num_classes, size, seed)
        details["test_split"] = {"of": "all images", "fraction": test_fraction, "seed": seed,
                                 "size": int(len(test)), "sha256": splits.split_digest(test)}
    is_test = np.zeros(len(decoded.labels), bool)
    is_test[test] = True
    return RawSplits(
        x_train=decoded.images[~is_test], y_train=decoded.labels[~is_test],
        x_test=decoded.images[is_test], y_test=decoded.labels[is_test],
        pixel_max=255.0, class_names=decoded.class_names, origin=origin, details=details,
    )
