"""`data.source: parquet`: one Parquet file, or a folder of shards, with an encoded-image column and a
label column: the layout Hugging Face datasets publishes, read with pyarrow alone (no `datasets`).

- Image column (`data.image_column`, default `image`): encoded bytes, or a `{bytes, path}` struct as
  Hugging Face writes it; only the bytes are read (a path-only row is unreadable: nothing is fetched).
- Label column (`data.label_column`, default `label`): integer class indices, named by the file's
  Hugging Face `ClassLabel` names where its schema metadata has them, else `0`, `1`, ...; or strings,
  whose sorted distinct values are the classes. At most 1000 classes.
- Split: a string `split` column (rows `train` / `test`; others ignored and counted), else the shards'
  names (`train-00000-of-00002.parquet`, `train/0000.parquet`; `validation-...` ignored), else
  everything is training data and a test split is carved off by seed.

Memory stays bounded: the labels are read a column at a time, then the images one row group at a
time (a row group over MAX_ROW_GROUP_BYTES is refused before it is read), each decoded into one
preallocated uint8 array.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts.safe_read import one_line
from pipeline.data.sources import RawSplits
from pipeline.data.sources.encoded import Decoded, cache_key, cached, check_capacity, to_splits
from pipeline.data.sources.files import MAX_CLASSES
from pipeline.data.sources.imagefolder import shown
from pipeline.data.sources.images import DecodeReport, Unreadable, decode
from pipeline.errors import UserError
from pipeline.run.config import DataConfig

MAX_ROW_GROUP_BYTES = 256 << 20
SPLIT_COLUMN = "split"
ROLES = ("train", "test")


def load(config: DataConfig, cache_dir: Path) -> RawSplits:
    import pyarrow.parquet as pq

    root = Path(config.data_dir or "")
    shards = _shards(root)
    report = DecodeReport()
    opened = []
    for rel, path in shards:
        try:
            opened.append((rel, path, pq.ParquetFile(path)))
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise UserError(f"{shown(path)} is not a readable Parquet file ({one_line(err, 160)})") from None
    has_split_column = all(SPLIT_COLUMN in f.schema_arrow.names for _, _, f in opened)
    roles = {rel: _role(rel) for rel, _, _ in opened}
    by_name = not has_split_column and any(roles.values())
    rows: list[tuple[int, int, int]] = []  # (shard, row, is_test) of every row that is kept
    raw_labels: list[Any] = []
    names_hint: list[str] | None = None
    for shard, (rel, path, handle) in enumerate(opened):
        _check_columns(path, handle, config)
        names_hint = names_hint or _hf_names(handle, config.label_column)
        if by_name and roles[rel] is None:
            report.ignored += handle.metadata.num_rows
            continue
        labels = _column(path, handle, config.label_column)
        split = _column(path, handle, SPLIT_COLUMN) if has_split_column else None
        for row, label in enumerate(labels):
            role = (split[row] if split is not None else roles[rel] if by_name else "train")
            if role not in ROLES:
                report.ignored += 1
                continue
            if label is None:
                _unreadable(path, row, "null label", config, report)
                continue
            rows.append((shard, row, int(role == "test")))
            raw_labels.append(label)
    if not rows:
        raise UserError(f"{shown(root)} holds no training rows; expected rows with a label and, where a split is "
                        "named, split 'train'")
    labels, class_names = _classes(raw_labels, names_hint, root, config.label_column)
    check_capacity(len(rows), config.channels, config.image_size, shown(root))
    settings = {"source": "parquet", "channels": config.channels, "image_size": config.image_size,
                "on_unreadable": config.on_unreadable, "image_column": config.image_column,
                "label_column": config.label_column}
    key = cache_key({**settings, "null_labels": report.skipped_examples, "ignored": report.ignored},
                    [(rel, path) for rel, path, _ in opened])
    has_test = has_split_column or by_name
    if has_test and not any(test for _, _, test in rows):
        has_test = False  # a split names no test rows: carve them, as for data without a split

    def produce() -> Decoded:
        return _decode_all(opened, rows, labels, class_names, has_test, config, report)

    decoded = cached(cache_dir, "parquet", key, produce)
    return to_splits(decoded, seed=config.seed, test_fraction=config.test_fraction,
                     origin=f"parquet:{shown(root.resolve())}", settings=settings)


def _shards(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise UserError(f"data.data_dir={shown(root)!r} does not exist; expected a Parquet file or a folder of shards")
    found = sorted((p for p in root.rglob("*.parquet")
                    if not any(part.startswith(".") for part in p.relative_to(root).parts) and p.is_file()),
                   key=lambda p: str(p.relative_to(root)).encode("utf-8", "surrogateescape"))
    if not found:
        raise UserError(f"{shown(root)} holds no .parquet files; expected a Parquet file or a folder of shards")
    real_root = root.resolve()
    for path in found:
        target = path.resolve()
        if real_root not in target.parents:
            raise UserError(f"{shown(path)} is a symlink out of data.data_dir; expected the shards inside it")
    return [(shown(p.relative_to(root)), p) for p in found]


def _role(rel: str) -> str | None:
    """train / test from a shard's path (a folder named so, or a file name starting so), else None."""
    parts = Path(rel).parts
    for role in ROLES:
        if role in parts[:-1] or parts[-1].startswith(role):
            return role
    return None


def _check_columns(path: Path, handle, config: DataConfig) -> None:
    import pyarrow as pa

    schema = handle.schema_arrow
    for param in ("image_column", "label_column"):
        column = getattr(config, param)
        if column not in schema.names:
            raise UserError(f"{shown(path)} has no column {column!r} (data.{param}); expected one of: "
                            f"{'|'.join(schema.names[:20])}")
    image = schema.field(config.image_column).type
    if not (_is_binary(image) or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
                                  and _is_binary(image.field("bytes").type))):
        raise UserError(f"{shown(path)}: column {config.image_column!r} has type {image}; expected encoded image "
                        "bytes (binary) or a {bytes, path} struct")
    label = schema.field(config.label_column).type
    if pa.types.is_dictionary(label):
        label = label.value_type
    if not (pa.types.is_integer(label) or pa.types.is_string(label) or pa.types.is_large_string(label)):
        raise UserError(f"{shown(path)}: column {config.label_column!r} has type {label}; expected integer class "
                        "indices or class-name strings")
    for index in range(handle.metadata.num_row_groups):
        size = handle.metadata.row_group(index).total_byte_size
        if size > MAX_ROW_GROUP_BYTES:
            raise UserError(f"{shown(path)}: row group {index} holds {size >> 20} MiB; expected row groups of at most "
                            f"{MAX_ROW_GROUP_BYTES >> 20} MiB (rewrite it with a smaller row_group_size)")


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _column(path: Path, handle, name: str) -> list[Any]:
    try:
        return handle.read(columns=[name]).column(0).to_pylist()
    except Exception as err:
        raise UserError(f"{shown(path)}: column {name!r} cannot be read ({one_line(err, 160)})") from None


def _hf_names(handle, label_column: str) -> list[str] | None:
    """The ClassLabel names Hugging Face datasets stores in the schema metadata, if any."""
    metadata = handle.schema_arrow.metadata or {}
    try:
        info = json.loads(metadata[b"huggingface"])
        names = info["info"]["features"][label_column]["names"]
    except (KeyError, TypeError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _classes(raw: list[Any], hint: list[str] | None, root: Path, column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if len({isinstance(label, str) for label in raw}) > 1:
        raise UserError(f"{shown(root)}: column {column!r} holds integers in some shards and strings in others; "
                        "expected one kind of label throughout")
    if isinstance(raw[0], str):
        names = sorted(set(raw), key=lambda n: n.encode("utf-8", "surrogateescape"))
        if len(names) > MAX_CLASSES:
            raise UserError(f"{shown(root)}: column {column!r} holds {len(names)} distinct labels; expected at most "
                            f"{MAX_CLASSES} classes")
        index = {name: i for i, name in enumerate(names)}
        return np.array([index[label] for label in raw], np.int32), tuple(names)
    labels = np.array(raw, np.int64)
    low, high = int(labels.min()), int(labels.max())
    limit = len(hint) if hint else MAX_CLASSES
    if low < 0 or high >= min(limit, MAX_CLASSES):
        bad = low if low < 0 else high
        raise UserError(f"{shown(root)}: column {column!r} holds label {bad}; expected class indices "
                        f"0..{min(limit, MAX_CLASSES) - 1} (at most {MAX_CLASSES} classes)")
    names = hint if hint else [str(c) for c in range(high + 1)]
    return labels.astype(np.int32), tuple(names)


def _unreadable(path: Path, row: int, reason: str, config: DataConfig, report: DecodeReport) -> None:
    if config.on_unreadable == "stop":
        raise UserError(f"{shown(path)} row {row}: {reason}; expected an encoded PNG, JPEG, BMP or WebP image and a "
                        "label (data.on_unreadable=skip skips and counts such rows)")
    report.skip(f"{shown(path)} row {row}", reason)


def _decode_all(opened, rows, labels, class_names, has_test, config: DataConfig, report: DecodeReport) -> Decoded:
    from tqdm import tqdm

    size, channels = config.image_size, config.channels
    images = np.zeros((len(rows), size, size, channels), np.uint8)
    keep = np.zeros(len(rows), bool)
    wanted: dict[int, dict[int, int]] = {}  # shard -> row -> position in `rows`
    for position, (shard, row, _) in enumerate(rows):
        wanted.setdefault(shard, {})[row] = position
    with tqdm(total=len(rows), desc="decode", unit="image", disable=None) as progress:
        for shard, positions in wanted.items():
            _, path, handle = opened[shard]
            first = 0
            for group in range(handle.metadata.num_row_groups):
                count = handle.metadata.row_group(group).num_rows
                try:
                    column = handle.read_row_group(group, columns=[config.image_column]).column(0)
                except Exception as err:
                    raise UserError(f"{shown(path)}: row group {group} cannot be read ({one_line(err, 160)})") from None
                for offset in range(count):
                    position = positions.get(first + offset)
                    if position is None:
                        continue
                    try:
                        images[position] = decode(_image_bytes(column[offset].as_py()), channels, size, report)
                        keep[position] = True
                    except Unreadable as err:
                        _unreadable(path, first + offset, err.reason, config, report)
                    progress.update(1)
                first += count
    kept_labels = labels[keep]
    is_test = np.array([test for _, _, test in rows], bool)[keep]
    counts = np.bincount(kept_labels[~is_test] if has_test else kept_labels, minlength=len(class_names))
    if (counts == 0).any():
        raise UserError(f"class {class_names[int(np.argmin(counts))]!r} has no readable training image; expected at "
                        "least one in every class")
    return Decoded(images[keep], kept_labels, is_test if has_test else None, tuple(class_names), report.as_dict())


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            raise Unreadable("no image bytes (a path-only image; nothing is fetched)" if value.get("path")
                             else "null image")
        return data
    if value is None:
        raise Unreadable("null image")
    return value

