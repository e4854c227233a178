"""The distilled dataset on disk: one self-describing .npz per support set.

Keys `images` and `labels` follow the layout of the KIP paper's released sets, so existing
loaders work; `classes`, the fitted preprocessing (`transform/*`) and a JSON `metadata` string
make the file usable on its own: a reader can map test images into the same space and trace the
set back to its data, kernel and params. `checksums` (JSON) holds one sha256 per other member and
one over them all, so `kip inspect` can say which part was altered. Files are written atomically
and byte-reproducibly.

The checks below are hand-written because the file may come from anywhere (a DVC remote, a
colleague, a damaged disk): every reader of a distilled set (`kip evaluate`, `kip train`, the
stages, `kip inspect`) must get either a set it can use or one line saying what is wrong, and
no generic schema library here would know what "usable" means (class ids within the label
width, a transform that fits the images, metadata `KernelConfig` accepts).

A distilled support is small, and the readers (this one and pipeline.artifacts.parquet) refuse one
that is not from its headers (the Parquet footer), before a byte of its data is read: a file of
3.6 million zero images deflates to a few MB, and its checksums are no obstacle to whoever writes it.

- `MAX_SUPPORT_IMAGES` = 10,000 images. Every use of a support solves in its n x n kernel (KIP's
  loss, `kip evaluate`'s KRR, Label Solve): n^2 memory and n^3 time. At 10,000 that kernel is 400 MB
  of float32 (800 MB with distill.float64) and one solve in it some 3 x 10^11 operations. This
  project's paper experiments distil 1 to 50 images per class (at most 500 images,
  experiments/paper/params.yaml) and its scaling measurements go to 1000 (docs/scaling.md): the
  bound is 10x the largest of those, and a set past it no longer distils anything.
- `MAX_SUPPORT_BYTES` = 128 MiB for the support's arrays together (images, labels, classes; the
  Parquet file's decoded rows). 10,000 CIFAR-sized images (32x32x3 float32) are 123 MB; 500 of
  them, 6 MB. `kip inspect` reads a support at this bound in 0.2 GiB of address space beyond its
  baseline (.npz; Parquet less), well inside the 1 GiB a hostile file may cost a reader
  (docs/testing.md); pyarrow needs about 3x a table's size while it decodes one, so twice the
  bound would not be.
- `MAX_TEXT_BYTES` = 64 MiB per text member (metadata, checksums): the largest metadata, the
  privacy section's two numbers per image at 10,000 images, is about 2 MB.
- Every transform array no larger than the images make it (`channel_mean` one value per channel,
  `zca_matrix` d x d): a ZCA matrix is the one array that may be large (`MAX_ARRAY_BYTES`), and only
  for images of as many pixels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.artifacts import atomic, safe_read
from pipeline.data.preprocess import Transform
from pipeline.errors import UserError
from pipeline.run import config as cfg

FORMAT_VERSION = 2
_TRANSFORM_PREFIX = "transform/"
_CHECKSUMS = "checksums"
_EXPECTED = "a distilled .npz written by `kip distill`"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_METADATA_SECTIONS = {"data": cfg.DataConfig, "preprocess": cfg.PreprocessConfig, "kernel": cfg.KernelConfig}
# Per array, the same cap as prepared.npz (pipeline.data.prepared.MAX_ARRAY_BYTES, 1 GiB): the largest
# array a set holds is its ZCA matrix (float64, d x d), the very matrix prepared.npz holds, so any set
# distilled from a readable prepared.npz must be readable too. Images and labels are far smaller.
MAX_ARRAY_BYTES = 4 * safe_read.MAX_ARRAY_BYTES
# What a distilled support may be (the module docstring says why): images, and bytes of the support's
# arrays together; and bytes of one text member (metadata, checksums).
MAX_SUPPORT_IMAGES = 10_000
MAX_SUPPORT_BYTES = 1 << 27
MAX_TEXT_BYTES = 1 << 26
_SUPPORT_ARRAYS = ("images", "labels", "classes")
_REMEDY = "re-create it with `kip distill` (a smaller distill.support_per_class), or check where the file came from"


@dataclass(frozen=True)
class DistilledSet:
    images: np.ndarray  # (n, H, W, C) float32, in the transform's output space
    labels: np.ndarray  # (n, C) float32 regression targets (learned or centred one-hot)
    classes: np.ndarray  # (n,) int32 class each image was initialised from
    transform: Transform
    metadata: dict[str, Any]


# --- writing ----------------------------------------------------------------------------------------

def save_npz(path: Path, distilled: DistilledSet) -> None:
    """Write atomically and byte-reproducibly; refuses non-finite arrays or metadata."""
    path = Path(path)
    arrays = _member_arrays(path, distilled)
    arrays[_CHECKSUMS] = np.array(json.dumps(checksum_record(arrays), sort_keys=True))
    atomic.save_npz(path, arrays)


def _member_arrays(path: Path, distilled: DistilledSet) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "images": np.asarray(distilled.images, np.float32),
        "labels": np.asarray(distilled.labels, np.float32),
        "classes": np.asarray(distilled.classes, np.int32),
    }
    for key, value in distilled.transform.to_arrays().items():
        arrays[_TRANSFORM_PREFIX + key] = value
    atomic.check_finite_arrays(path, arrays)
    metadata = {"format_version": FORMAT_VERSION, **distilled.metadata}
    arrays["metadata"] = np.array(atomic.finite_json(metadata, f"{path}: metadata", sort_keys=True))
    return arrays


# --- checksums (shared with the Parquet artifact) ---------------------------------------------------

def part_digest(name: str, array: np.ndarray) -> str:
    """sha256 over a part's name, dtype, shape and bytes: a reshaped or retyped part changes it too."""
    array = np.asarray(array)
    digest = hashlib.sha256(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # the bytes, not a copy of them
    return digest.hexdigest()


def checksum_record(parts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{"parts": {name: sha256}, "all": sha256 over those}: one per part says which part changed."""
    digests = {name: part_digest(name, value) for name, value in sorted(parts.items())}
    return {"parts": digests, "all": _overall_digest(digests)}


def _overall_digest(digests: Mapping[str, str]) -> str:
    text = "".join(f"{name}={digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def parse_checksums(path: Path, text: str, where: str) -> dict[str, Any]:
    """The stored checksum record, or one line saying it is malformed."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        record = None
    parts = record.get("parts") if isinstance(record, dict) else None
    valid = (
        isinstance(parts, dict)
        and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in parts.values())
        and isinstance(record.get("all"), str) and _SHA256.fullmatch(record["all"])
    )
    if not valid:
        raise UserError(f"{path}: {where} is not a checksum record ({{\"parts\": {{...}}, \"all\": sha256}}); the file was altered or damaged")
    return record


def verify_checksums(path: Path, record: Mapping[str, Any], parts: Mapping[str, np.ndarray]) -> None:
    """Name the first part whose bytes differ from the stored sha256 (then missing/extra parts)."""
    stored = record["parts"]
    for name in sorted(parts):
        if name not in stored:
            raise UserError(f"{path}: {name} is not covered by the stored checksums; the file was altered")
        if part_digest(name, parts[name]) != stored[name]:
            verb = "do" if name.endswith("s") else "does"
            raise UserError(f"{path}: {name} {verb} not match the stored checksum; the file was altered or damaged")
    missing = sorted(set(stored) - set(parts))
    if missing:
        raise UserError(f"{path}: {missing[0]} is recorded in the checksums but missing from the file")
    if _overall_digest(stored) != record["all"]:
        raise UserError(f"{path}: the stored checksums do not match their overall checksum; the file was altered or damaged")


def check_format_version(path: Path, version: object) -> None:
    """Version 1 files have no checksum over classes, metadata and transform: refuse, say why."""
    if version == FORMAT_VERSION:
        return
    if version is None:
        raise UserError(f"{path} records no format version; expected an artifact written by `kip distill`")
    if version in (1, "1"):
        raise UserError(
            f"{path} was written by an older kip (format version 1) and has no full checksum; "
            "re-run `kip distill` (or `dvc repro distill`) to rewrite it"
        )
    raise UserError(f"{path} has format version {shown(version)}; this kip reads version {FORMAT_VERSION}")


# --- reading ----------------------------------------------------------------------------------------

def load_npz(path: Path) -> DistilledSet:
    """Read and check a distilled .npz; any defect is a one-line UserError naming the file."""
    path = Path(path)
    safe_read.check_regular(path, _EXPECTED)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file (not a zip archive: another format, or truncated)")
    arrays = safe_read.read_npz(path, max_array_bytes=MAX_ARRAY_BYTES, strings=True,  # metadata is a string
                                check=lambda headers: _check_declared(path, headers))
    _check_members_present(path, arrays)
    metadata = _parse_metadata(path, arrays["metadata"])
    check_format_version(path, metadata.get("format_version"))
    if _CHECKSUMS not in arrays:
        raise UserError(f"{path} lacks {_CHECKSUMS}; expected {_EXPECTED}")
    record = parse_checksums(path, _string_member(path, arrays, _CHECKSUMS), _CHECKSUMS)
    parts = {k: v for k, v in arrays.items() if k != _CHECKSUMS}
    verify_checksums(path, record, parts)
    stored = {k[len(_TRANSFORM_PREFIX):]: v for k, v in arrays.items() if k.startswith(_TRANSFORM_PREFIX)}
    distilled = DistilledSet(
        arrays["images"], arrays["labels"], arrays["classes"], _transform(path, stored), metadata
    )
    check_consistent(path, distilled)
    check_metadata(path, metadata, distilled.labels.shape[1])
    check_agreement(path, distilled)
    return dataclasses.replace(distilled, classes=distilled.classes.astype(np.int32))


def check_support_size(path: Path, images: int, nbytes: int, where: str, detail: str = "") -> None:
    """Refuse a support of more than MAX_SUPPORT_IMAGES images or MAX_SUPPORT_BYTES bytes, in one line
    saying what `where` (e.g. "images declare") declared (`detail` added to the bytes) and what is allowed."""
    if images > MAX_SUPPORT_IMAGES:
        raise UserError(f"{path}: {where} {images} support images; a distilled set holds 1 to {MAX_SUPPORT_IMAGES} "
                        f"(each use solves an n x n kernel): {_REMEDY}")
    if nbytes > MAX_SUPPORT_BYTES:
        raise UserError(f"{path}: {where} {nbytes} bytes of support data ({nbytes / 2**20:.0f} MiB{detail}); a distilled "
                        f"set holds at most {MAX_SUPPORT_BYTES} bytes ({MAX_SUPPORT_BYTES >> 20} MiB): {_REMEDY}")


def _check_declared(path: Path, headers: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """What the .npy headers declare, before any data is read: a support no larger than a distilled
    one, text members of bounded size, and transform arrays no larger than the images make them."""
    sizes = {name: (shape, math.prod(shape), math.prod(shape) * dtype.itemsize) for name, (shape, dtype) in headers.items()}
    support = [name for name in _SUPPORT_ARRAYS if name in sizes]
    images = max((sizes[name][0][0] for name in support if sizes[name][0]), default=0)
    first = next((name for name in support if sizes[name][0] and sizes[name][0][0] == images), "images")
    check_support_size(path, images, sum(sizes[name][2] for name in support), f"{first} declare")
    for name, (shape, dtype) in headers.items():
        if dtype.kind in safe_read.STRING_KINDS and sizes[name][2] > MAX_TEXT_BYTES:
            raise UserError(f"{path}: {name} declares {sizes[name][2]} bytes of text; at most {MAX_TEXT_BYTES} bytes "
                            f"({MAX_TEXT_BYTES >> 20} MiB) are allowed: the file was altered or damaged")
    image_shape = sizes["images"][0] if "images" in sizes else ()
    if len(image_shape) != 4:
        return  # check_consistent names the images' shape
    channels, dim = image_shape[3], math.prod(image_shape[1:])
    most = {"channel_mean": (channels, f"{channels} finite values (one per channel)"),
            "channel_std": (channels, f"{channels} finite values (one per channel)"),
            "zca_matrix": (dim * dim, f"({dim}, {dim}) finite values"), "zca_reg": (1, "one number")}
    for key, (count, expected) in most.items():
        name = _TRANSFORM_PREFIX + key
        if name in sizes and sizes[name][1] > count:
            raise UserError(f"{path}: transform {key} has shape {sizes[name][0]}; expected {expected}")


def _check_members_present(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    missing = [k for k in ("images", "labels", "classes", "metadata") if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; expected {_EXPECTED}")
    missing = [k for k in Transform.ARRAY_KEYS if _TRANSFORM_PREFIX + k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {_TRANSFORM_PREFIX}{missing[0]}; expected the preprocessing stored by `kip distill`")


def _string_member(path: Path, arrays: Mapping[str, np.ndarray], key: str) -> str:
    value = arrays[key]
    if value.ndim != 0 or value.dtype.kind != "U":
        raise UserError(f"{path}: {key} has dtype {value.dtype} and shape {value.shape}; expected one string")
    return str(value)


def _parse_metadata(path: Path, value: np.ndarray) -> dict[str, Any]:
    text = _string_member(path, {"metadata": value}, "metadata")
    return parse_json_object(path, text, "metadata")


def parse_json_object(path: Path, text: str, where: str) -> dict[str, Any]:
    """A JSON object from a stored string, or one line naming the file and where it was."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{path}: {where} is not valid JSON ({safe_read.one_line(err)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: {where} is a JSON {type(value).__name__}; expected a JSON object")
    return value


def _transform(path: Path, stored: Mapping[str, np.ndarray]) -> Transform:
    """The stored preprocessing, with each array's kind and rank checked before use."""
    expected = {"method": ("U", 0), "channel_mean": ("f", 1), "channel_std": ("f", 1), "zca_matrix": ("f", 2), "zca_reg": ("f", 0)}
    for key, (kind, ndim) in expected.items():
        value = stored[key]
        if value.dtype.kind != kind or value.ndim != ndim:
            wanted = "one string" if kind == "U" else f"a {ndim}-d float array"
            raise UserError(f"{path}: {_TRANSFORM_PREFIX}{key} has dtype {value.dtype} and shape {value.shape}; expected {wanted}")
    return Transform.from_arrays(dict(stored))


def check_consistent(path: Path, distilled: DistilledSet) -> None:
    """Shapes, kinds, class range and finiteness: what every consumer of a set relies on."""
    _check_support(path, distilled.images, distilled.labels, distilled.classes)
    check_transform(path, distilled.transform, tuple(distilled.images.shape[1:]))


def _check_support(path: Path, images: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> None:
    if images.ndim != 4 or images.dtype.kind != "f" or 0 in images.shape[1:]:
        raise UserError(f"{path}: images have shape {images.shape} and dtype {images.dtype}; expected (n, H, W, C) floats")
    n = len(images)
    if n == 0:
        raise UserError(f"{path} holds no support images; expected at least one")
    if labels.ndim != 2 or labels.dtype.kind != "f" or labels.shape[1] == 0:
        raise UserError(f"{path}: labels have shape {labels.shape} and dtype {labels.dtype}; expected (n, classes) floats")
    if classes.dtype.kind not in "iu":
        raise UserError(f"{path}: classes have dtype {classes.dtype}; expected integers (the class of each image)")
    if labels.shape[0] != n or classes.shape != (n,):
        raise UserError(f"{path}: {n} images but labels {labels.shape} and classes {classes.shape}")
    num_classes = labels.shape[1]
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.size:
        raise UserError(f"{path}: classes must be in 0..{num_classes - 1} (one per label column); found {bad[0]}")
    if not (np.isfinite(images).all() and np.isfinite(labels).all()):
        raise UserError(f"{path}: images or labels contain NaN/Inf")


def check_transform(path: Path, transform: Transform, image_shape: tuple[int, ...]) -> None:
    """The preprocessing must be a known method whose fitted values fit these images."""
    if transform.method not in cfg.PREPROCESS_METHODS:
        allowed = "|".join(cfg.PREPROCESS_METHODS)
        raise UserError(f"{path}: transform method={shown(transform.method)} is not allowed; expected one of: {allowed}")
    channels = image_shape[-1]
    for name in ("channel_mean", "channel_std"):
        value = getattr(transform, name)
        if value.shape != (channels,) or not np.isfinite(value).all():
            raise UserError(f"{path}: transform {name} has shape {value.shape}; expected {channels} finite values (one per channel)")
    if transform.method in ("standardize", "zca") and not (transform.channel_std > 0).all():
        raise UserError(f"{path}: transform channel_std has values <= 0; expected positive standard deviations")
    if not (np.isfinite(transform.zca_reg) and transform.zca_reg >= 0):
        raise UserError(f"{path}: transform zca_reg={transform.zca_reg!r}; expected a finite number >= 0")
    if transform.method == "zca":
        dim = int(np.prod(image_shape))
        matrix = transform.zca_matrix
        if matrix.shape != (dim, dim) or not np.isfinite(matrix).all():
            raise UserError(f"{path}: transform zca_matrix has shape {matrix.shape}; expected ({dim}, {dim}) finite values")


def check_metadata(path: Path, metadata: Mapping[str, Any], num_classes: int) -> None:
    """The lineage sections that `kip evaluate`/`kip train` and the stages build configs from."""
    for name, record in _METADATA_SECTIONS.items():
        section = _section(path, metadata, name)
        try:
            cfg.from_mapping(record, section, name)
            record(**section)  # the raw values too: readers build the record from them directly
        except UserError as err:
            raise UserError(f"{path}: metadata {safe_read.one_line(err, 300)}") from None
    dataset = _section(path, metadata, "dataset")
    fingerprint = dataset.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise UserError(f"{path}: metadata dataset.fingerprint={shown(fingerprint)}; expected the dataset's sha256")
    names = dataset.get("class_names")
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: metadata dataset.class_names is not a list of {num_classes} names (one per label column)")


PARAMS_HASH_SECTIONS = ("data", "dataset", "preprocess", "validation", "kernel", "distill")


def params_hash(sections: Mapping[str, Any]) -> str:
    """sha256 of a set's lineage: what made it (the data, its preprocessing and split, the kernel,
    the KIP settings). `kip distill` stores it as metadata `params_hash`; a reader recomputes it."""
    lineage = {name: sections[name] for name in PARAMS_HASH_SECTIONS if name in sections}
    return hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()


def check_agreement(path: Path, distilled: DistilledSet) -> None:
    """What two parts of a set both state must agree, or the set is not scored: a file edited in
    one place (and re-sealed: the checksums catch accidental damage only) would otherwise be scored
    under preprocessing or labels it was not distilled with.

    - metadata `preprocess` and the stored transform: the same method (and ZCA ridge);
    - labels and classes, where the metadata says the labels were not learned (`distill.method=kip`,
      `learn_labels=false`): the labels are exactly the classes' centred one-hot rows;
    - the lineage sections (data, dataset, preprocess, validation, kernel, distill) and
      `params_hash`, their sha256, where a set carries one (every set `kip distill` writes): an edited
      kernel would otherwise be scored under the kernel its editor chose.
    """
    metadata, transform = distilled.metadata, distilled.transform
    preprocess = metadata["preprocess"]
    if preprocess.get("method") != transform.method:
        raise UserError(f"{path}: metadata preprocess.method={shown(preprocess.get('method'))} but the stored transform "
                        f"is {transform.method!r}: the file disagrees with itself; re-create it rather than score it")
    if transform.method == "zca" and float(preprocess.get("zca_reg", -1)) != float(transform.zca_reg):
        raise UserError(f"{path}: metadata preprocess.zca_reg={shown(preprocess.get('zca_reg'))} but the stored "
                        f"transform's is {float(transform.zca_reg)!r}: the file disagrees with itself")
    distill = metadata.get("distill")
    if isinstance(distill, dict) and distill.get("method") == "kip" and distill.get("learn_labels") is False:
        num_classes = distilled.labels.shape[1]
        # krr.centered_one_hot, written out: reading a set must not need JAX.
        one_hot = np.eye(num_classes, dtype=np.float32)[distilled.classes] - np.float32(1.0 / num_classes)
        if not np.array_equal(distilled.labels, one_hot):
            rows = int(np.sum(np.any(distilled.labels != one_hot, axis=1)))
            raise UserError(f"{path}: metadata says the labels were not learned (distill.learn_labels=false), but {rows} "
                            "label rows differ from their classes' one-hot rows: the file disagrees with itself")
    stated = metadata.get("params_hash")
    if stated is not None and stated != params_hash(metadata):
        edited = [name for name in PARAMS_HASH_SECTIONS if name in metadata]
        raise UserError(f"{path}: metadata params_hash {shown(stated)} is not the sha256 of its lineage sections "
                        f"({', '.join(edited)}): one of them was edited after distilling; the file disagrees with itself")


def shown(value: object) -> str:
    """A value from a file, as it may appear in a one-line message: repr, bounded."""
    return safe_read.one_line(repr(value), 80)


def _section(path: Path, metadata: Mapping[str, Any], name: str) -> dict[str, Any]:
    section = metadata.get(name)
    if section is None:
        raise UserError(f"{path}: metadata lacks the {name} section; expected the lineage `kip distill` writes")
    if not isinstance(section, dict):
        raise UserError(f"{path}: metadata {name} is a JSON {type(section).__name__}; expected an object")
    return section
