"""The distilled dataset as Parquet: one row per support image, lineage in the schema metadata.

Columns: `index`, `class`, `class_name`, `label` (fixed-size list, one value per class) and
`image` (fixed-size list of H*W*C float32, row-major NHWC; the shape is in the metadata).
Schema metadata (`kip.*` keys, JSON values) carries what a reader needs to trust and use the rows:
the run's metadata (data, preprocessing, kernel, params, seed, code version), the image shape, a
sha256 over the arrays, and the preprocessing transform. Mean/std are embedded; a ZCA matrix
(d x d, 75 MB for CIFAR) is not: the metadata points at the .npz that holds it, with its sha256.

Read it in one line: `pandas.read_parquet("artifacts/distilled.parquet")`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import atomic
from pipeline.artifacts import FORMAT_VERSION, DistilledSet, check_consistent
from pipeline.errors import UserError
from pipeline.preprocess import Transform


def array_checksum(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over float32 little-endian images then labels: identical in .npz and .parquet."""
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def save_parquet(path: Path, distilled: DistilledSet, class_names: list[str], npz_name: str) -> None:
    """Write atomically; `npz_name` is the sibling .npz that holds the full transform."""
    n = len(distilled.images)
    shape = list(distilled.images.shape[1:])
    flat = np.ascontiguousarray(distilled.images, np.float32).reshape(n, -1)
    labels = np.ascontiguousarray(distilled.labels, np.float32)
    table = pa.table({
        "index": pa.array(np.arange(n, dtype=np.int32)),
        "class": pa.array(np.asarray(distilled.classes, np.int32)),
        "class_name": pa.array([class_names[c] for c in distilled.classes], pa.string()),
        "label": pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), labels.shape[1]),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
    })
    transform = distilled.transform
    transform_meta: dict[str, Any] = {
        "method": transform.method,
        "channel_mean": transform.channel_mean.tolist(),
        "channel_std": transform.channel_std.tolist(),
        "zca_reg": transform.zca_reg,
        "sha256": transform.checksum(),
    }
    if transform.method == "zca":
        transform_meta["zca_matrix"] = {"file": npz_name, "key": "transform/zca_matrix"}
    metadata = {
        "kip.format_version": str(FORMAT_VERSION),
        "kip.image_shape": json.dumps(shape),
        "kip.checksum": array_checksum(distilled.images, distilled.labels),
        "kip.transform": json.dumps(transform_meta, sort_keys=True),
        "kip.metadata": json.dumps(distilled.metadata, sort_keys=True),
    }
    table = table.replace_schema_metadata({k: v.encode() for k, v in metadata.items()})
    with atomic.replace_on_success(Path(path)) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: Path, zca_matrix: np.ndarray | None = None) -> DistilledSet:
    """Read and verify a distilled Parquet file (schema, shapes, checksum).

    For ZCA artifacts pass `zca_matrix` (from the sibling .npz); without it the returned
    transform has an empty matrix and only describes the preprocessing.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; expected a distilled .parquet written by the distill stage")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is not a readable Parquet file (corrupted or truncated: {err})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    missing = [k for k in ("kip.format_version", "kip.image_shape", "kip.checksum", "kip.transform", "kip.metadata") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks schema metadata {missing[0]}; expected a distilled .parquet written by kip")
    if meta["kip.format_version"] != str(FORMAT_VERSION):
        raise UserError(f"{path} has format version {meta['kip.format_version']}; this kip reads version {FORMAT_VERSION}")
    for column in ("class", "label", "image"):
        if column not in table.column_names:
            raise UserError(f"{path} lacks column {column!r}; expected index, class, class_name, label, image")
    shape = tuple(json.loads(meta["kip.image_shape"]))
    n = table.num_rows
    images = _fixed_list_values(table, "image", path).reshape((n, *shape))
    labels = _fixed_list_values(table, "label", path).reshape(n, -1)
    classes = table.column("class").to_numpy().astype(np.int32)
    if array_checksum(images, labels) != meta["kip.checksum"]:
        raise UserError(f"{path}: images/labels do not match the stored checksum; the file was altered or damaged")
    tmeta = json.loads(meta["kip.transform"])
    transform = Transform(
        method=tmeta["method"],
        channel_mean=np.asarray(tmeta["channel_mean"], np.float32),
        channel_std=np.asarray(tmeta["channel_std"], np.float32),
        zca_matrix=np.zeros((0, 0)) if zca_matrix is None else np.asarray(zca_matrix, np.float64),
        zca_reg=float(tmeta["zca_reg"]),
    )
    distilled = DistilledSet(images, labels, classes, transform, json.loads(meta["kip.metadata"]))
    check_consistent(path, distilled)
    return distilled


def transform_record(path: Path) -> dict[str, Any]:
    """The `kip.transform` metadata of a Parquet artifact (without reading the rows)."""
    schema = pq.read_schema(path)
    return json.loads((schema.metadata or {})[b"kip.transform"].decode())


def _fixed_list_values(table: pa.Table, column: str, path: Path) -> np.ndarray:
    chunked = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(chunked.type):
        raise UserError(f"{path}: column {column!r} has type {chunked.type}; expected a fixed-size list of float32")
    return np.asarray(chunked.flatten().to_numpy(zero_copy_only=False), np.float32)
