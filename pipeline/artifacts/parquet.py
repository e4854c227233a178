"""The distilled dataset as Parquet: one row per support image, lineage in the schema metadata.

Columns: `index`, `class`, `class_name`, `label` (fixed-size list, one value per class) and
`image` (fixed-size list of H*W*C float32, row-major NHWC; the shape is in the metadata).
Schema metadata (`kip.*` keys, JSON values) carries what a reader needs to trust and use the rows:
the run's metadata (data, preprocessing, kernel, params, seed, code version), the image shape, the
preprocessing transform, and checksums: `kip.checksums` holds one sha256 per column and per
`kip.*` value, `kip.checksum` the sha256 over those. The file holds the whole preprocessing
transform, so it can be shared alone (`dvc artifacts get ... distilled` delivers just this file):
mean/std in `kip.transform`, and a ZCA matrix (d x d float64, 4.9 MB for MNIST, 75 MB for CIFAR)
as raw little-endian bytes in the file's key-value metadata under `kip.zca_matrix`. That key is
written to the Parquet footer only, not to the Arrow schema, so pandas never loads it with the rows
and it is not stored twice; `kip.transform` records the transform's sha256, which the reader checks
against the matrix it finds.

The reader's checks are hand-written for the same reason as the .npz's (pipeline.artifacts.npz): a
file from anywhere must yield a usable set or one line naming what is wrong, within bounded
memory. The footer is the only part read before these bounds are checked, so it is bounded first:
its length (`MAX_FOOTER_BYTES`, read from the file's last 8 bytes) and, while pyarrow parses it, the
length of any list in it (`MAX_ROW_GROUPS`) and of any value (`MAX_FOOTER_BYTES`). Then, from the
footer alone, the rows must be a support the .npz could hold (`npz.MAX_SUPPORT_IMAGES` rows,
`npz.MAX_SUPPORT_BYTES` decoded: per column the larger of its uncompressed size and its value count
times the value width, so dictionary-encoded zeros count at their decoded size) in at most
`MAX_ROW_GROUPS` row groups. Class names are read dictionary-encoded and their decoded size counted
before they are expanded.

- `MAX_ROW_GROUPS` = 1000. kip writes one row group (a support is below pyarrow's 1Mi-row default);
  other writers split by rows (DuckDB: 122,880) or by bytes (Spark: 128 MB), so a support within
  the bounds above takes a few. 1000 still allows 10 rows per group at the largest support; 50,000
  one-row groups cost pyarrow 15 s and 1.4 GB to read.
- `MAX_FOOTER_BYTES` = 96 MiB. The footer holds the ZCA matrix (CIFAR's: 75 MB) besides the schema
  and lineage (KBs to a few MB), so a ZCA set of up to about 3500 values per image is complete in
  its Parquet file; a larger one is read from its .npz. pyarrow takes about 6x a footer's size in
  memory to parse it and hand its values over, so a footer at this bound stays inside the 1 GiB a
  hostile file may cost a reader (docs/testing.md).

Read it in one line: `pandas.read_parquet("artifacts/distilled.parquet")`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import atomic, npz as artifacts, safe_read
from pipeline.artifacts.npz import FORMAT_VERSION, DistilledSet
from pipeline.data.preprocess import Transform
from pipeline.errors import UserError
from pipeline.run import config as cfg

MAX_ROW_GROUPS = 1000  # row groups of one file, and entries of any list in its footer (the docstring says why)
MAX_FOOTER_BYTES = 96 << 20  # the footer, and any one value in it (the ZCA matrix is one)
_EXPECTED = "a distilled .parquet written by kip"
_COLUMNS = ("index", "class", "class_name", "label", "image")
_HASHED_KEYS = ("kip.format_version", "kip.image_shape", "kip.transform", "kip.metadata")
_REQUIRED_KEYS = ("kip.format_version", "kip.image_shape", "kip.checksum", "kip.checksums", "kip.transform", "kip.metadata")
_ZCA_KEY = "kip.zca_matrix"  # footer key-value metadata: the d x d ZCA matrix, float64 little-endian
_ZCA_RECORD = {"key": _ZCA_KEY, "dtype": "<f8"}


# --- writing ----------------------------------------------------------------------------------------

def save_parquet(path: Path, distilled: DistilledSet, class_names: list[str]) -> None:
    """Write atomically, with everything a reader needs (the ZCA matrix included)."""
    path = Path(path)
    transform = distilled.transform
    atomic.check_finite_arrays(path, {"images": distilled.images, "labels": distilled.labels,
                                      **{f"transform/{k}": v for k, v in transform.to_arrays().items()}})
    table = _table(path, distilled, class_names)
    transform_meta: dict[str, Any] = {
        "method": transform.method,
        "channel_mean": transform.channel_mean.tolist(),
        "channel_std": transform.channel_std.tolist(),
        "zca_reg": transform.zca_reg,
        "sha256": transform.checksum(),
    }
    footer: dict[str, bytes] = {}
    if transform.method == "zca":
        transform_meta["zca_matrix"] = dict(_ZCA_RECORD)
        footer[_ZCA_KEY] = np.ascontiguousarray(transform.zca_matrix, "<f8").tobytes()
    strings = {
        "kip.format_version": str(FORMAT_VERSION),
        "kip.image_shape": json.dumps(list(distilled.images.shape[1:])),
        "kip.transform": atomic.finite_json(transform_meta, f"{path}: kip.transform", sort_keys=True),
        "kip.metadata": atomic.finite_json(distilled.metadata, f"{path}: metadata", sort_keys=True),
    }
    with atomic.replace_on_success(path) as tmp:
        write_sealed(tmp, sealed(table, strings), footer)


def write_sealed(path: Path, table: pa.Table, footer: Mapping[str, bytes]) -> None:
    """Write `table` (its schema metadata included) plus `footer` key-values outside the Arrow schema."""
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        writer.write_table(table)
        if footer:
            writer.add_key_value_metadata(dict(footer))


def sealed(table: pa.Table, strings: Mapping[str, str]) -> pa.Table:
    """`table` with the `kip.*` schema metadata `strings` plus checksums over them and every column."""
    record = artifacts.checksum_record(_parts(table, strings))
    metadata = {**strings, "kip.checksum": record["all"], "kip.checksums": json.dumps(record, sort_keys=True)}
    return table.replace_schema_metadata({k: v.encode() for k, v in metadata.items()})


def _table(path: Path, distilled: DistilledSet, class_names: list[str]) -> pa.Table:
    n = len(distilled.images)
    classes = np.asarray(distilled.classes, np.int32)
    if classes.size and (classes.min() < 0 or classes.max() >= len(class_names)):
        raise UserError(f"{path}: classes must be in 0..{len(class_names) - 1} (one per class name); found {classes.max()}")
    flat = np.ascontiguousarray(distilled.images, np.float32).reshape(n, -1)
    labels = np.ascontiguousarray(distilled.labels, np.float32)
    return pa.table({
        "index": pa.array(np.arange(n, dtype=np.int32)),
        "class": pa.array(classes),
        "class_name": pa.array([class_names[c] for c in classes], pa.string()),
        "label": pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), labels.shape[1]),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
    })


def _parts(table: pa.Table, strings: Mapping[str, str]) -> dict[str, np.ndarray]:
    """What the checksums cover: every column, and every `kip.*` value but the checksums."""
    parts = {f"column {name!r}": _column_array(table.column(name)) for name in table.column_names}
    parts.update({key: np.frombuffer(strings[key].encode(), np.uint8) for key in _HASHED_KEYS})
    return parts


def _column_array(column: pa.ChunkedArray) -> np.ndarray:
    """A column as a deterministic array: numbers as numbers, anything else as its JSON text."""
    kind = column.type
    if pa.types.is_fixed_size_list(kind) and _is_number(kind.value_type) and column.null_count == 0:
        values = _one_chunk(column).flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), kind.list_size)
    if _is_number(kind) and column.null_count == 0:
        return column.to_numpy()
    return np.frombuffer(json.dumps(column.to_pylist(), default=str).encode(), np.uint8)


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (combine_chunks would copy it), or the chunks
    combined."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


# --- reading ----------------------------------------------------------------------------------------

def read_parquet(path: Path) -> DistilledSet:
    """Read and verify a distilled Parquet file (schema, checksums, shapes, lineage, transform)."""
    path = Path(path)
    with safe_read.open_regular(path, _EXPECTED) as handle:
        parquet_file = _open(path, handle)
        meta = _schema_metadata(path, parquet_file)
        _check_declared(path, parquet_file.metadata, parquet_file.schema_arrow)
        table = _read_table(path, handle, parquet_file)
        footer = parquet_file.metadata.metadata or {}
    _verify(path, table, meta)
    shape = _image_shape(path, meta["kip.image_shape"])
    tmeta = parse_transform(path, meta["kip.transform"])
    metadata = artifacts.parse_json_object(path, meta["kip.metadata"], "kip.metadata")
    _check_column_types(path, table, shape)
    n = table.num_rows
    transform = Transform(
        method=tmeta["method"],
        channel_mean=np.asarray(tmeta["channel_mean"], np.float32),
        channel_std=np.asarray(tmeta["channel_std"], np.float32),
        zca_matrix=_zca_matrix(path, footer, int(np.prod(shape))) if tmeta["method"] == "zca" else np.zeros((0, 0)),
        zca_reg=float(tmeta["zca_reg"]),
    )
    distilled = DistilledSet(
        images=_fixed_list_values(table, "image").reshape((n, *shape)),
        labels=_fixed_list_values(table, "label").reshape(n, table.column("label").type.list_size),
        classes=table.column("class").to_numpy(),
        transform=transform,
        metadata=metadata,
    )
    artifacts.check_consistent(path, distilled)
    if transform.checksum() != tmeta["sha256"]:
        raise UserError(f"{path}: the preprocessing transform does not match the sha256 kip.transform records; "
                        "the file was altered or damaged")
    artifacts.check_metadata(path, metadata, distilled.labels.shape[1])
    artifacts.check_agreement(path, distilled)
    return dataclasses.replace(distilled, classes=distilled.classes.astype(np.int32))


def _zca_matrix(path: Path, footer: Mapping[bytes, bytes], dim: int) -> np.ndarray:
    """The embedded d x d ZCA matrix; its size is checked before it is interpreted."""
    raw = footer.get(_ZCA_KEY.encode())
    if raw is None:
        raise UserError(f"{path} records ZCA preprocessing but lacks its matrix ({_ZCA_KEY}); "
                        "expected a file written by this kip (older ones kept it in the sibling .npz)")
    if len(raw) != dim * dim * 8:
        raise UserError(f"{path}: {_ZCA_KEY} holds {len(raw)} bytes; expected {dim} x {dim} float64 ({dim * dim * 8} bytes)")
    return np.frombuffer(raw, "<f8").reshape(dim, dim).astype(np.float64)


def _unreadable(path: Path, err: BaseException) -> UserError:
    return UserError(f"{path} is not a readable Parquet file (corrupted or truncated: {safe_read.one_line(err)})")


def _open(path: Path, handle) -> pq.ParquetFile:
    """The file's footer, parsed only once its length is known to be within MAX_FOOTER_BYTES, and
    with every list in it at most MAX_ROW_GROUPS long and every value at most MAX_FOOTER_BYTES."""
    size = os.fstat(handle.fileno()).st_size
    if size >= 12:  # "PAR1", the footer, its 4-byte length, "PAR1"; pyarrow names anything shorter
        handle.seek(size - 8)
        length, magic = struct.unpack("<I4s", handle.read(8))
        handle.seek(0)
        if magic == b"PAR1" and length > MAX_FOOTER_BYTES:
            raise UserError(f"{path} has a footer of {length} bytes ({length / 2**20:.0f} MiB); a distilled set's "
                            f"footer is at most {MAX_FOOTER_BYTES} bytes ({MAX_FOOTER_BYTES >> 20} MiB): the file is "
                            "not a distilled set, or is damaged; re-create it with `kip distill`")
    try:
        return pq.ParquetFile(handle, thrift_string_size_limit=MAX_FOOTER_BYTES, thrift_container_size_limit=MAX_ROW_GROUPS)
    except (pa.ArrowException, OSError, ValueError) as err:
        if "Exceeded size limit" in str(err):
            raise UserError(
                f"{path}: its footer lists more than {MAX_ROW_GROUPS} row groups (or columns, or metadata keys), or holds "
                f"a value over {MAX_FOOTER_BYTES >> 20} MiB; a distilled set is read from 1 to {MAX_ROW_GROUPS} row "
                f"groups: rewrite it in fewer (pyarrow.parquet.write_table(..., row_group_size={artifacts.MAX_SUPPORT_IMAGES}))"
            ) from None
        raise _unreadable(path, err) from None


def _schema_metadata(path: Path, parquet_file: pq.ParquetFile) -> dict[str, str]:
    """The `kip.*` schema metadata."""
    try:
        schema = parquet_file.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    try:
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    except UnicodeDecodeError:
        raise UserError(f"{path}: schema metadata is not UTF-8 text; the file was altered or damaged") from None
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if "kip.format_version" in missing:
        raise UserError(f"{path} lacks schema metadata kip.format_version; expected {_EXPECTED}")
    version = meta["kip.format_version"]
    artifacts.check_format_version(path, int(version) if re.fullmatch(r"[0-9]{1,6}", version) else version)
    if missing:
        raise UserError(f"{path} lacks schema metadata {missing[0]}; expected {_EXPECTED}")
    return meta


def _check_declared(path: Path, file_meta: pq.FileMetaData, schema: pa.Schema) -> None:
    """From the footer alone, before any row is read: at most MAX_ROW_GROUPS row groups, and rows that
    are a support the .npz reader would accept (npz.check_support_size).

    The decoded size is the larger of what the row groups declare uncompressed and the rows times
    the schema's fixed widths (fixed-size image and label lists, numbers), so dictionary-encoded zeros
    count at full size; strings (class names) count as declared and are measured again once read
    (_decoded_names). Column chunks are never opened here: pyarrow 2x aborts the process (an uncaught
    C++ exception) on some damaged column-chunk statistics, where a row group's totals are safe."""
    groups = file_meta.num_row_groups
    if groups > MAX_ROW_GROUPS:
        raise UserError(f"{path} declares {groups} row groups; a distilled set is read from 1 to {MAX_ROW_GROUPS}: rewrite "
                        f"it in fewer (pyarrow.parquet.write_table(..., row_group_size={artifacts.MAX_SUPPORT_IMAGES}))")
    try:
        declared = [(group.num_rows, group.total_byte_size) for group in map(file_meta.row_group, range(groups))]
    except (pa.ArrowException, OSError, ValueError, IndexError) as err:
        raise _unreadable(path, err) from None
    rows = max(file_meta.num_rows, sum(n for n, _ in declared), 0)  # a damaged file's two counts may disagree
    row_width = sum(_fixed_width(field.type) for field in schema)
    nbytes = max(sum(max(size, 0) for _, size in declared), rows * row_width)
    artifacts.check_support_size(path, rows, nbytes, "its footer declares", f"; {row_width} bytes a row")


def _fixed_width(kind: pa.DataType) -> int:
    """Bytes a value of `kind` takes once decoded, where the schema fixes it (0 for strings)."""
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size * _fixed_width(kind.value_type)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return max(kind.bit_width // 8, 1)
    return 0


def _read_table(path: Path, handle, parquet_file: pq.ParquetFile) -> pa.Table:
    """The rows, class names dictionary-encoded until _decoded_names has measured them."""
    names = parquet_file.schema_arrow.names
    for column in _COLUMNS:
        if column not in names:
            raise UserError(f"{path} lacks column {column!r}; expected {', '.join(_COLUMNS)}")
    try:
        reader = pq.ParquetFile(handle, metadata=parquet_file.metadata, read_dictionary=["class_name"])
        table = reader.read()
    except MemoryError as err:  # pa.ArrowMemoryError too: not a damaged file, but this machine's memory
        raise UserError(f"{path}: not enough memory to read its {parquet_file.metadata.num_rows} rows "
                        f"({safe_read.one_line(err)}); free memory and retry") from None
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    return _decoded_names(path, table)


def _decoded_names(path: Path, table: pa.Table) -> pa.Table:
    """class_name, read dictionary-encoded, expanded only once its expanded size is known to fit: a
    few long names repeated over every row are small in the file and in the footer's sizes."""
    column = table.column("class_name")
    if not pa.types.is_dictionary(column.type):
        return table
    value_type = column.type.value_type
    if _is_text(value_type):  # other types have fixed widths, counted by the footer's value counts
        lengths = (pc.take(pc.binary_length(chunk.dictionary), chunk.indices) for chunk in column.chunks)
        names = sum(pc.sum(length).as_py() or 0 for length in lengths)
        others = sum(table.column(name).nbytes for name in table.column_names if name != "class_name")
        artifacts.check_support_size(path, table.num_rows, names + others, "its rows hold", "; class names expanded")
    return table.set_column(table.column_names.index("class_name"), "class_name", column.cast(value_type))


def _is_text(kind: pa.DataType) -> bool:
    return any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary))


def _verify(path: Path, table: pa.Table, meta: Mapping[str, str]) -> None:
    record = artifacts.parse_checksums(path, meta["kip.checksums"], "kip.checksums")
    if record["all"] != meta["kip.checksum"]:
        raise UserError(f"{path}: kip.checksum does not match kip.checksums; the file was altered or damaged")
    artifacts.verify_checksums(path, record, _parts(table, meta))


def _image_shape(path: Path, text: str) -> tuple[int, int, int]:
    try:
        shape = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        shape = None
    valid = (
        isinstance(shape, list) and len(shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape)
    )
    if not valid:
        raise UserError(f"{path}: kip.image_shape={safe_read.one_line(text, 60)} is not allowed; expected [H, W, C] positive integers")
    return tuple(shape)


def parse_transform(path: Path, text: str) -> dict[str, Any]:
    """`kip.transform`, checked: a known method, numeric fitted values, a safe ZCA pointer."""
    tmeta = artifacts.parse_json_object(path, text, "kip.transform")
    method = tmeta.get("method")
    if method not in cfg.PREPROCESS_METHODS:
        allowed = "|".join(cfg.PREPROCESS_METHODS)
        raise UserError(f"{path}: kip.transform method={artifacts.shown(method)} is not allowed; expected one of: {allowed}")
    for key in ("channel_mean", "channel_std"):
        values = tmeta.get(key)
        if not isinstance(values, list) or not all(_is_finite_number(v) for v in values):
            raise UserError(f"{path}: kip.transform {key} is not a list of finite numbers")
    if not _is_finite_number(tmeta.get("zca_reg")) or tmeta["zca_reg"] < 0:
        raise UserError(f"{path}: kip.transform zca_reg={artifacts.shown(tmeta.get('zca_reg'))}; expected a finite number >= 0")
    if not isinstance(tmeta.get("sha256"), str):
        raise UserError(f"{path}: kip.transform lacks sha256; expected {_EXPECTED}")
    pointer = tmeta.get("zca_matrix")
    if method == "zca" and isinstance(pointer, dict) and pointer.get("key") == "transform/zca_matrix":
        raise UserError(f"{path} was written by an older kip that kept the ZCA matrix in the sibling .npz; "
                        "inspect or use that .npz, or re-run distill to write a self-contained Parquet file")
    if method == "zca" and pointer != _ZCA_RECORD:
        raise UserError(f"{path}: kip.transform zca_matrix={artifacts.shown(tmeta.get('zca_matrix'))}; "
                        f"expected {json.dumps(_ZCA_RECORD)} (the matrix embedded in this file)")
    return tmeta


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_column_types(path: Path, table: pa.Table, shape: tuple[int, ...]) -> None:
    if table.num_rows == 0:
        raise UserError(f"{path} has no rows; expected at least one support image")
    for name in _COLUMNS:
        if table.column(name).null_count:
            raise UserError(f"{path}: column {name!r} has {table.column(name).null_count} null values; expected none")
    expected = {
        "index": (pa.types.is_integer, "integers"),
        "class": (pa.types.is_integer, "integer class ids"),
        "class_name": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "strings"),
        "label": (_is_float_list, "a fixed-size list of float32"),
        "image": (_is_float_list, "a fixed-size list of float32"),
    }
    for name, (accepts, wanted) in expected.items():
        kind = table.column(name).type
        if not accepts(kind):
            raise UserError(f"{path}: column {name!r} has type {kind}; expected {wanted}")
    size = table.column("image").type.list_size
    if size != math.prod(shape):
        raise UserError(f"{path}: column 'image' holds {size} values per row but kip.image_shape {list(shape)} needs {math.prod(shape)}")


def _is_float_list(kind: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)


def _fixed_list_values(table: pa.Table, column: str) -> np.ndarray:
    chunked = _one_chunk(table.column(column))
    return np.asarray(chunked.flatten().to_numpy(zero_copy_only=False), np.float32)
